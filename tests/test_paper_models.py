"""The paper's models: UNet parameter counts, LoRA's trainable count, and Stable Diffusion + LoRA
end to end on a tiny random SD stack (same classes as miniSD, a few thousand parameters).

Counts are taken on the meta device (no weight memory) and checked against SPEC.md section 4 and
against an independent count from the layer shapes.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from dtrak_ray.core.gradients import GradientComputer, select_parameters
from dtrak_ray.core.models import (
    PAPER_PARAMETERS_M,
    PAPER_UNETS,
    build_unet,
    count_on_meta,
    count_parameters,
    paper_unet_parameters,
    unet_kwargs,
)
from dtrak_ray.core.training import Recipe
from tests.conftest import TINY_MODEL


@pytest.mark.parametrize("name", ["cifar", "celeba"])
def test_paper_unet_parameter_counts_match_the_paper(name):
    n = paper_unet_parameters(name)
    assert round(n / 1e6, 1) == PAPER_PARAMETERS_M[name]
    with torch.device("meta"):
        model = UNet2DModel(**unet_kwargs(**PAPER_UNETS[name]))
    assert model.config.resnet_time_scale_shift == "scale_shift"
    attn = [i for i, b in enumerate(model.config.down_block_types) if b.startswith("Attn")]
    assert attn == list(PAPER_UNETS[name]["attention_levels"])


def test_meta_count_equals_a_real_model():
    real = build_unet(0, **TINY_MODEL)
    assert count_on_meta(lambda: UNet2DModel(**unet_kwargs(**TINY_MODEL))) == count_parameters(real) > 0


def test_unet_kwargs_refuses_sd_lora():
    with pytest.raises(ValueError, match="core.sd"):
        unet_kwargs(**TINY_MODEL, kind="sd-lora", lora_rank=4, pretrained="x")
    assert unet_kwargs(**TINY_MODEL, kind="unet", lora_rank=128, pretrained=None)["in_channels"] == 1


def test_lora_rank_128_on_minisd_is_25_5m():
    from dtrak_ray.core.sd import LORA_TARGETS, MINISD_UNET, lora_parameter_count

    n = lora_parameter_count(rank=128)
    assert round(n / 1e6, 1) == 25.5
    # Independently: a rank-r adapter on Linear(in, out) adds r * (in + out) weights (A and B, no bias).
    with torch.device("meta"):
        unet = UNet2DConditionModel(**MINISD_UNET)
    linears = [m for name, m in unet.named_modules() if any(name.endswith("." + t) for t in LORA_TARGETS)]
    assert len(linears) == 4 * 2 * 16  # 16 transformer blocks (SD 1.x), self- and cross-attention: q, k, v, out each
    assert n == sum(128 * (m.in_features + m.out_features) for m in linears)


# ---- Stable Diffusion + LoRA on a tiny random stack ---------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from dtrak_ray.core import sd

    path = sd.write_tiny_sd(tmp_path_factory.mktemp("tiny-sd"), image_size=16, seed=0)
    return path, sd.load_sd(path, rank=4, seed=0)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tiny_stack_loads_with_lora_only_trainable(tiny_sd):
    from dtrak_ray.core.sd import LORA_TARGETS

    _, stack = tiny_sd
    trainable = stack.lora_names()
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert not any(p.requires_grad for p in stack.vae.parameters()) and not any(p.requires_grad for p in stack.text_encoder.parameters())
    targets = [n for n, m in stack.unet.named_modules() if any(n.endswith("." + t) for t in LORA_TARGETS) and hasattr(m, "lora_A")]
    assert len(targets) == 4 * 2 * 4  # 4 transformer blocks (down, mid, 2 up) x 2 attentions x q, k, v, out
    ids = stack.tokenizer(["a ukiyo-e painting"]).input_ids[0]
    assert ids[0] == stack.tokenizer.bos_token_id and ids[-1] == stack.tokenizer.eos_token_id and len(ids) == 2 + len("a ukiyo-e painting".replace(" ", ""))  # one token per character, no spaces


def test_train_lora_changes_only_the_adapters_and_roundtrips(tiny_sd, tmp_path):
    from dtrak_ray.core import sd

    path, _ = tiny_sd
    stack = sd.load_sd(path, rank=4, seed=1)
    before = {n: p.detach().clone() for n, p in stack.unet.named_parameters()}
    latents = sd.encode_images(stack, _images(6, 0))
    assert latents.shape == (6, 4, 8, 8)
    assert torch.equal(latents, sd.encode_images(stack, _images(6, 0)))  # the posterior mean: deterministic
    emb = sd.encode_prompts(stack, ["a ukiyo-e painting", "a post-impressionism painting"])
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    losses = sd.train_lora(stack, latents, emb[labels], Recipe(2, 4, 1e-3, (0.9, 0.999), 0.0, 0.0, 1.0, True), seed=3,
                           flipped=sd.encode_images(stack, _images(6, 0).flip(-1)))
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
    changed = {n for n, p in stack.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(stack.lora_names())
    sd.save_lora(stack, tmp_path / "lora")
    again = sd.load_sd(path, rank=4, seed=99, lora_dir=tmp_path / "lora")
    assert all(torch.equal(p, dict(again.unet.named_parameters())[n]) for n, p in stack.unet.named_parameters())


def test_train_lora_in_fp16_follows_float32(tiny_sd):
    """The paper's fp16 mixed precision (autocast + gradient scaler; here the CPU's autocast) against float32."""
    from dtrak_ray.core import sd

    path, _ = tiny_sd
    runs = {}
    for mp in ("no", "fp16"):
        stack = sd.load_sd(path, rank=4, seed=1)
        latents = sd.encode_images(stack, _images(6, 0))
        emb = sd.encode_prompts(stack, ["a ukiyo-e painting", "a post-impressionism painting"])
        recipe = Recipe(2, 4, 1e-3, (0.9, 0.999), 0.0, 0.0, 1.0, False, mixed_precision=mp)
        losses = sd.train_lora(stack, latents, emb[torch.tensor([0, 1, 0, 1, 0, 1])], recipe, seed=3)
        lora = {n: p.detach().clone() for n, p in stack.unet.named_parameters() if p.requires_grad}
        runs[mp] = (losses, lora)
    (ref_losses, ref), (losses, lora) = runs["no"], runs["fp16"]
    assert {p.dtype for p in lora.values()} == {torch.float32}
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-2, atol=0)
    diff = max(float((lora[n] - ref[n]).abs().max()) for n in ref)
    assert 0 < diff < 1e-2 * max(float(ref[n].abs().max()) for n in ref)  # autocast ran, and stayed close


def test_per_sample_gradients_wrt_lora_match_autograd(tiny_sd):
    from dtrak_ray.core import sd

    _, stack = tiny_sd
    latents = sd.encode_images(stack, _images(3, 1))
    emb = sd.encode_prompts(stack, ["a ukiyo-e painting"])
    model = sd.PromptConditioned(stack.unet, emb[0])
    names = select_parameters(model, [sd.LORA_PATTERN])
    gc = GradientComputer(model, stack.scheduler, names)
    assert gc.dim == sum(p.numel() for p in stack.unet.parameters() if p.requires_grad)
    fast = gc.averaged(latents, [4, 7, 9], "l_square", {2: [0, 500]}, noise_seed=0)[2].double()
    slow = gc.reference_averaged(latents, [4, 7, 9], "l_square", [0, 500], noise_seed=0)
    assert slow.abs().max() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-7)


def test_generation_with_the_sd_pipeline_is_keyed_by_index(tiny_sd):
    from dtrak_ray.core import sd

    _, stack = tiny_sd
    prompts = ["a ukiyo-e painting", "a post-impressionism painting"]
    both = sd.generate(stack, prompts, [0, 1], seed=5, steps=3)
    assert both.shape == (2, 3, 16, 16) and both.min() >= -1 and both.max() <= 1
    alone = sd.generate(stack, prompts[1:], [1], seed=5, steps=3)
    torch.testing.assert_close(alone[0], both[1], rtol=0, atol=1e-5)
    assert not torch.allclose(sd.generate(stack, prompts[1:], [1], seed=6, steps=3), alone)


def test_sd_lora_attribution_end_to_end(tiny_sd):
    """The whole method on the SD + LoRA path, in core: train base and subset LoRAs, generate,
    ground truth, LoRA-only features, scores, LDS."""
    import numpy as np

    from dtrak_ray.core import sd
    from dtrak_ray.core.kernel import fit_kernel, scores_for_lambdas
    from dtrak_ray.core.lds import lds
    from dtrak_ray.core.projectors import make_projector
    from dtrak_ray.data import subset_masks
    from dtrak_ray.datasets.artbench import caption

    path, _ = tiny_sd
    captions = [caption(s) for s in ("post_impressionism", "ukiyo_e")]
    recipe = Recipe(1, 4, 1e-3, (0.9, 0.999), 0.0, 0.0, 1.0, False)
    base = sd.load_sd(path, rank=2, seed=0)
    emb = sd.encode_prompts(base, captions)
    train_lat, val_lat = sd.encode_images(base, _images(8, 2)), sd.encode_images(base, _images(4, 3))
    y_train, y_val = torch.tensor([0, 1] * 4), torch.tensor([0, 1] * 2)
    sd.train_lora(base, train_lat, emb[y_train], recipe, seed=0)
    gen = sd.generate(base, [captions[i % 2] for i in range(2)], [0, 1], seed=0, steps=2)
    assert gen.shape == (2, 3, 16, 16)

    masks = subset_masks(y_train.numpy(), 4, 0.5, seed=0)
    outputs = []
    for m, mask in enumerate(masks):
        sub = sd.load_sd(path, rank=2, seed=m + 1)
        keep = torch.from_numpy(mask)
        sd.train_lora(sub, train_lat[keep], emb[y_train[keep]], recipe, seed=m + 1)
        outputs.append(sd.latent_outputs(sub, val_lat, y_val, emb, range(4), [0, 250, 500, 750], noise_seed=0).numpy())
    outputs = np.stack(outputs)
    assert outputs.shape == (4, 4) and (outputs > 0).all()

    p = sum(q.numel() for q in base.unet.parameters() if q.requires_grad)
    proj = make_projector("gaussian", p, 16, seed=0)
    grids = {2: [0, 500]}
    phi_train = sd.latent_features(base, proj, train_lat, y_train, emb, range(8), "l_square", grids, 0, "per-sample", 4)[2]
    phi_val = sd.latent_features(base, proj, val_lat, y_val, emb, range(4), "l_square", grids, 0, "per-sample", 4)[2]
    # Row 3 (label 1) recomputed alone, without grouping: the same feature.
    model = sd.PromptConditioned(base.unet, emb[1])
    from dtrak_ray.core.gradients import GradientComputer, select_parameters

    gc = GradientComputer(model, base.scheduler, select_parameters(model, [sd.LORA_PATTERN]))
    alone = proj.project(gc.reference_averaged(train_lat[3:4], [3], "l_square", grids[2], 0).float())
    torch.testing.assert_close(phi_train[3:4], alone, rtol=1e-3, atol=1e-6)

    scores = scores_for_lambdas(fit_kernel(phi_train.double().numpy()), phi_train.double().numpy(), phi_val.double().numpy(), [1e-2, 1.0])
    assert scores.shape == (2, 4, 8) and np.isfinite(scores).all()
    result = lds(scores[1], masks, outputs, n_resamples=4)
    from scipy.stats import spearmanr

    # Independently: LDS of val sample 0 = Spearman over subsets of (-sum of kept scores, output).
    pred = -(masks.astype(float) @ scores[1][0])
    assert result.per_sample.shape == (4,)
    np.testing.assert_allclose(result.per_sample[0], spearmanr(pred, outputs[:, 0]).statistic, atol=1e-9)


def test_missing_pretrained_folder_names_the_field(tmp_path):
    from dtrak_ray.core import sd
    from dtrak_ray.errors import MissingArtifactError

    with pytest.raises(MissingArtifactError, match="model.pretrained"):
        sd.load_sd(tmp_path / "no-such-sd", rank=4, seed=0)
