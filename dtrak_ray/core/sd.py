"""Stable Diffusion + LoRA, the paper's ArtBench setting (SPEC.md section 4), as pure functions.

A latent diffusion model: images are encoded by the VAE (``AutoencoderKL``), captions
("a {style} painting") by the CLIP text encoder, and the ``UNet2DConditionModel`` predicts the
noise of the latents, conditioned on the caption. Only LoRA adapters of rank r on the attention
projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` are trained (peft); the rest is frozen.
At rank 128 on the miniSD (Stable Diffusion 1.x) UNet that is 25.5M trainable parameters
(:func:`lora_parameter_count`, counted on the meta device without weights).

Interface, mirroring the UNet path of :mod:`dtrak_ray.core`:
- :func:`load_sd` / :func:`save_lora`: the frozen stack from a local diffusers folder plus LoRA
  (initialised from an explicit seed, or loaded from a saved adapter).
- :func:`encode_images` (latents, VAE posterior mean times the scaling factor, so a latent is a
  function of the image), :func:`encode_prompts` (CLIP hidden states).
- :class:`PromptConditioned`: the UNet with one prompt's embedding fixed, callable as
  ``model(x_t, t).sample`` like a ``UNet2DModel``. The core's ``GradientComputer``,
  ``l_simple_outputs`` and ``train`` code then run unchanged on latents, one prompt group at a
  time; gradients are taken wrt the LoRA parameters only (:data:`LORA_PATTERN`).
- :func:`train_lora`: the recipe on latents (``recipe.mixed_precision``: the paper's fp16 autocast
  with a gradient scaler), :func:`generate`: the diffusers ``StableDiffusionPipeline`` with DDIM, start
  latents keyed by (seed, image index) like :func:`dtrak_ray.core.sampling.ddim_sample`.
- :func:`latent_outputs`, :func:`latent_features`: the LDS ground truth and the projected LoRA
  gradients of latents, each row under its own caption (rows grouped by label).
- :func:`write_tiny_sd`: a tiny random SD stack in the diffusers folder layout, with a tiny
  byte-level CLIP tokenizer built offline (no download), for tests and smoke runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from dtrak_ray.core.diffusion import NoiseScheme, keyed_noise, make_ddim
from dtrak_ray.core.features import project_rows
from dtrak_ray.core.gradients import GradientComputer, select_parameters
from dtrak_ray.core.groundtruth import l_simple_outputs
from dtrak_ray.core.models import count_on_meta, use_plain_attention
from dtrak_ray.core.projectors import Projector
from dtrak_ray.core.training import Recipe, train_ddpm
from dtrak_ray.errors import MissingArtifactError

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_PATTERN = "*lora_*"  # fnmatch pattern of the adapter weights (features.parameters)

# The Stable Diffusion 1.x UNet (miniSD is SD 1.4 fine-tuned at 256 px: 32x32 latents).
MINISD_UNET: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)


def lora_config(rank: int) -> Any:
    """peft's LoraConfig of the paper: rank r, alpha = r, on attention q, k, v, out."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))


def add_lora(unet: UNet2DConditionModel, rank: int, seed: int) -> UNet2DConditionModel:
    """Freeze ``unet`` and add LoRA adapters, initialised from ``seed`` (explicit, not global)."""
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(lora_config(rank))
    return unet


def lora_parameter_count(unet_config: dict[str, Any] | None = None, rank: int = 128) -> int:
    """Trainable LoRA parameters of a UNet2DConditionModel config, counted on the meta device.

    The default config is miniSD's (SD 1.x) UNet: 25,509,888 at rank 128.
    """

    def build() -> torch.nn.Module:
        unet = UNet2DConditionModel(**(unet_config or MINISD_UNET))
        unet.requires_grad_(False)
        unet.add_adapter(lora_config(rank))
        return unet

    return count_on_meta(build)


@dataclass
class SDStack:
    """The frozen VAE and text encoder, the tokenizer, the UNet with LoRA, and the DDPM scheduler."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: Any
    tokenizer: Any
    scheduler: DDPMScheduler

    def lora_names(self) -> list[str]:
        return [n for n, p in self.unet.named_parameters() if p.requires_grad]

    def to(self, device: torch.device | str) -> SDStack:
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device)
        return self


def load_sd(pretrained: str | Path, rank: int, seed: int, lora_dir: str | Path | None = None) -> SDStack:
    """The stack of a local diffusers Stable Diffusion folder, with fresh (seeded) or saved LoRA."""
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(pretrained)
    if not (path / "unet").is_dir():
        raise MissingArtifactError(
            f"model.pretrained={path} is not a diffusers Stable Diffusion folder (no unet/): save miniSD there "
            "(StableDiffusionPipeline.from_pretrained('lambdalabs/miniSD-diffusers').save_pretrained(PATH)) or fix the path"
        )
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").requires_grad_(False).eval()
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").requires_grad_(False).eval()
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    add_lora(unet, rank, seed)
    if lora_dir is not None:
        load_lora(unet, lora_dir)
    use_plain_attention(unet)  # vmap over fused attention takes a slow path
    return SDStack(unet, vae, text_encoder, tokenizer, scheduler)


def load_lora(unet: UNet2DConditionModel, directory: str | Path) -> None:
    """Load the LoRA weights :func:`save_lora` wrote in ``directory`` into ``unet``'s adapters."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(unet, load_file(str(Path(directory) / "lora.safetensors")))


def save_lora(stack: SDStack, directory: str | Path) -> Path:
    """Write the LoRA weights only (the frozen base stays at model.pretrained)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(stack.unet).items()}
    save_file(state, str(directory / "lora.safetensors"))
    return directory / "lora.safetensors"


@torch.no_grad()
def encode_prompts(stack: SDStack, prompts: Sequence[str]) -> torch.Tensor:
    """(n, seq, dim) CLIP hidden states of padded prompts, as Stable Diffusion conditions on them."""
    tok = stack.tokenizer(list(prompts), padding="max_length", max_length=stack.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    device = next(stack.text_encoder.parameters()).device
    return stack.text_encoder(tok.input_ids.to(device))[0]


@torch.no_grad()
def encode_images(stack: SDStack, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """(n, 4, h, w) latents: the VAE posterior mean times the scaling factor.

    The mean (not a sample) makes a latent a function of its image, so features and ground truth
    do not depend on a VAE noise draw.
    """
    device = next(stack.vae.parameters()).device
    out = [stack.vae.encode(b.to(device)).latent_dist.mean for b in images.split(batch_size)]
    return torch.cat(out).float().cpu() * stack.vae.config.scaling_factor


class PromptConditioned(torch.nn.Module):
    """The UNet conditioned on one fixed prompt embedding; ``model(x_t, t).sample`` like UNet2DModel.

    Under ``vmap`` over samples, ``x`` is one sample's (G, C, h, w) stack of timesteps; the
    embedding (1, seq, dim) is expanded to it, so per-sample gradients need no change to the core.
    """

    def __init__(self, unet: UNet2DConditionModel, embedding: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("embedding", embedding.reshape(1, *embedding.shape[-2:]), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> Any:
        cond = self.embedding.expand(x.shape[0], -1, -1)
        return self.unet(x, t, encoder_hidden_states=cond)


def train_lora(
    stack: SDStack,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    recipe: Recipe,
    seed: int,
    flipped: torch.Tensor | None = None,
    **checkpointing: Any,
) -> list[float]:
    """Train the LoRA weights on (n, 4, h, w) latents with per-sample (n, seq, dim) caption embeddings.

    The UNet path's loop (:func:`dtrak_ray.core.training.train_ddpm`) on latents: the same seeded
    randomness, mixed precision (``recipe.mixed_precision``; the paper's fp16) and checkpoints
    (``checkpointing``: ``resume``, ``checkpoint_every``, ``on_checkpoint``, whose states hold the
    adapter weights only). ``flipped``: latents of the horizontally flipped images, drawn instead
    with probability 1/2 when ``recipe.random_flip``. Returns the loss per epoch.
    """
    if latents.shape[0] == 0:
        raise ValueError("no training latents")
    return train_ddpm(stack.unet, stack.scheduler, latents, recipe, seed, cond=embeddings, flipped=flipped, **checkpointing)


@torch.no_grad()
def generate(
    stack: SDStack,
    prompts: Sequence[str],
    indices: Sequence[int],
    seed: int,
    steps: int = 50,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """(n, 3, H, W) images in [-1, 1] from the StableDiffusionPipeline with DDIM, one per (prompt, index).

    The start latents are keyed by (seed, index), so image i can be regenerated alone.
    ``guidance_scale`` 1 samples the conditional model without classifier-free guidance.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=stack.vae, text_encoder=stack.text_encoder, tokenizer=stack.tokenizer, unet=stack.unet,
        scheduler=make_ddim(stack.scheduler), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    c = stack.unet.config
    latents = keyed_noise((c.in_channels, c.sample_size, c.sample_size), seed, -1, list(indices))
    device = next(stack.unet.parameters()).device
    out = pipe(
        list(prompts), num_inference_steps=steps, eta=eta, guidance_scale=guidance_scale,
        latents=latents.to(device), output_type="np",
    ).images
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() * 2.0 - 1.0


# ---- a tiny stack for tests and smoke runs ------------------------------------------------------


def _byte_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_tokenizer(directory: str | Path, max_length: int = 32) -> Path:
    """A CLIP tokenizer with a character-level vocabulary (no merges), written offline.

    The vocabulary holds every byte symbol, alone and word-final (``</w>``), and the two special
    tokens: any text tokenizes, one token per character, which is all a tiny test stack needs.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = _byte_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length).save_pretrained(directory)
    return directory


def write_tiny_sd(directory: str | Path, image_size: int = 16, seed: int = 0) -> Path:
    """A tiny random Stable Diffusion stack in the diffusers folder layout (unet, vae, text_encoder,
    tokenizer, scheduler): the same classes as miniSD at a few thousand parameters each."""
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    tok_dir = write_tiny_tokenizer(directory / "tokenizer")
    vocab_size = len(json.loads((tok_dir / "vocab.json").read_text()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=image_size,
        )
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=32, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        ))
        unet = UNet2DConditionModel(
            sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
        )
    vae.save_pretrained(directory / "vae")
    text.save_pretrained(directory / "text_encoder")
    unet.save_pretrained(directory / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        directory / "scheduler"
    )
    (directory / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "tiny": True}))
    return directory


def latent_shape(stack: SDStack) -> tuple[int, int, int]:
    c = stack.unet.config
    return (c.in_channels, c.sample_size, c.sample_size)


# ---- the core's per-sample computations, one prompt group at a time -----------------------------


def _groups(labels: torch.Tensor) -> dict[int, torch.Tensor]:
    """Row positions of each label: rows sharing a caption share one :class:`PromptConditioned`."""
    return {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}


def latent_outputs(
    stack: SDStack, latents: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor, indices: Sequence[int],
    timesteps: Sequence[int], noise_seed: int,
) -> torch.Tensor:
    """(n,) LDS ground truth (L_Simple over ``timesteps``) of latents, each under its label's caption.

    Noise is keyed by (seed, t, ``indices[i]``), so grouping rows by caption changes nothing.
    """
    out = torch.empty(latents.shape[0])
    for c, pos in _groups(labels).items():
        model = PromptConditioned(stack.unet, embeddings[c])
        out[pos] = l_simple_outputs(model, stack.scheduler, latents[pos], [indices[i] for i in pos.tolist()], timesteps, noise_seed)
    return out


def latent_features(
    stack: SDStack, projector: Projector, latents: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor,
    indices: Sequence[int], f: str, grids: Mapping[int, Sequence[int]], noise_seed: int, scheme: NoiseScheme, micro_batch: int,
) -> dict[int, torch.Tensor]:
    """``{K: (n, k)}`` projected gradients wrt the LoRA weights only, each row under its caption."""
    out = {K: torch.empty(latents.shape[0], projector.k) for K in grids}
    for c, pos in _groups(labels).items():
        model = PromptConditioned(stack.unet, embeddings[c])
        gc = GradientComputer(model, stack.scheduler, select_parameters(model, [LORA_PATTERN]))
        rows = project_rows(gc, projector, latents[pos], [indices[i] for i in pos.tolist()], f, grids, noise_seed, scheme, micro_batch)
        for K, phi in rows.items():
            out[K][pos] = phi
    return out
