"""The stages' work for ``model.kind: sd-lora`` (Stable Diffusion + LoRA, the ArtBench setting).

The UNet stages call these through one-line hooks (``if cfg.model.kind == "sd-lora"``). The frozen
base (VAE, CLIP text encoder, tokenizer, UNet) comes from ``model.pretrained``; a stored "model"
is its LoRA weights only (``lora.safetensors`` at the model's key). The split's images stay pixel
images in the store (the Gen set too, so the report shows them); latents are computed from them
where needed with the VAE posterior mean, so they are a function of the stored image. Each image
is conditioned on its caption "a {style} painting": train and Val images by their label, Gen
image i by label ``i % number of styles`` (the prompt it was generated from).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from dtrak_ray.config import ExperimentConfig
from dtrak_ray.core import sd
from dtrak_ray.core.projectors import Projector
from dtrak_ray.core.training import TrainState
from dtrak_ray.stages.common import device_of, recipe_of
from dtrak_ray.storage import RunStore


def captions(run: RunStore) -> list[str]:
    """The captions of the run's classes, as the data stage recorded them."""
    attrs = dict(run.open_array(f"{run.INDICES}/train").attrs)
    caps = attrs.get("captions")
    if not caps:
        names = attrs.get("class_names") or []
        caps = [f"a {str(n).replace('_', '-')} painting" for n in names]
    return list(caps)


def labels_of(run: RunStore, split: str, n: int) -> torch.Tensor:
    """Caption index of every image of a split (Gen: the prompt it was generated from)."""
    if split == "gen":
        return torch.arange(n) % len(captions(run))
    return torch.from_numpy(run.read_array(f"{run.INDICES}/{split}_labels")).long()


def new_unet(cfg: ExperimentConfig, seed: int) -> torch.nn.Module:
    """The UNet with fresh LoRA adapters (for counting the parameters features are taken wrt)."""
    return sd.load_sd(cfg.model.pretrained, cfg.model.lora_rank, seed).unet


def is_lora_model(run: RunStore, key: str) -> bool:
    """Whether the model stored at ``key`` is LoRA weights (not a diffusers UNet directory)."""
    return run.exists(f"{key}/lora.safetensors")


def run_config(run: RunStore) -> ExperimentConfig:
    import yaml

    from dtrak_ray.config import parse_config

    return parse_config(yaml.safe_load(run.read_text(run.CONFIG)), source=run.url(run.CONFIG))


def load_stack(run: RunStore, cfg: ExperimentConfig, key: str) -> tuple[sd.SDStack, str]:
    """The pretrained stack with the LoRA weights stored at ``key``, and a digest of those weights."""
    with tempfile.TemporaryDirectory() as tmp:
        path = run.local_dir(key, tmp)
        stack = sd.load_sd(cfg.model.pretrained, cfg.model.lora_rank, 0, lora_dir=path)
        digest = hashlib.sha256((path / "lora.safetensors").read_bytes()).hexdigest()[:16]
    stack.unet.eval()
    return stack, digest


def _save_lora(run: RunStore, key: str, stack: sd.SDStack) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sd.save_lora(stack, tmp)
        run.put_dir(tmp, key)


def train_model(
    run: RunStore, cfg: ExperimentConfig, key: str, subset: int | None, seed: int, digest: str, keep_all: bool = False
) -> dict:
    """Train LoRA weights on the train split (or LDS subset ``subset``) with their captions; store them at ``key``.

    Checkpoints (adapter weights and training state) and resume as for a UNet
    (:func:`dtrak_ray.stages.train.fit_and_store`).
    """
    from dtrak_ray.stages.train import checkpoint_every, fit_and_store

    if run.done(key, digest):
        return {"status": "skipped", **(run.marker(key) or {})}
    images = torch.from_numpy(run.read_array(f"{run.INDICES}/train_images"))
    labels = labels_of(run, "train", images.shape[0])
    if subset is not None:
        mask = torch.from_numpy(run.read_array(f"{run.INDICES}/masks")[subset])
        images, labels = images[mask], labels[mask]
    stack = sd.load_sd(cfg.model.pretrained, cfg.model.lora_rank, seed).to(device_of(cfg))

    def load_weights(ckpt: str) -> dict[str, torch.Tensor]:
        with tempfile.TemporaryDirectory() as tmp:
            sd.load_lora(stack.unet, run.local_dir(ckpt, tmp))
        return {n: p.detach().clone() for n, p in stack.unet.named_parameters() if p.requires_grad}

    def fit(resume: TrainState | None, on_checkpoint: Callable[[TrainState], None]) -> list[float]:
        latents = sd.encode_images(stack, images)
        flipped = sd.encode_images(stack, images.flip(-1)) if cfg.train.random_flip else None
        emb = sd.encode_prompts(stack, captions(run)).cpu()
        return sd.train_lora(stack, latents, emb[labels], recipe_of(cfg), seed, flipped=flipped, resume=resume,
                             checkpoint_every=checkpoint_every(cfg), on_checkpoint=on_checkpoint)

    return fit_and_store(run, cfg, key, seed, digest, keep_all, int(images.shape[0]), fit, lambda k: _save_lora(run, k, stack), load_weights)


def generate(indices: list[int], run: RunStore, cfg: ExperimentConfig, key: str) -> np.ndarray:
    """Gen images ``indices`` (pixels in [-1, 1]) from the SD pipeline with DDIM; image i uses caption i % styles."""
    stack, _ = load_stack(run, cfg, key)
    stack.to(device_of(cfg))
    caps = captions(run)
    g = cfg.generate
    return sd.generate(stack, [caps[i % len(caps)] for i in indices], indices, g.seed, g.ddim_steps, g.eta).cpu().numpy()


def ground_truth(run: RunStore, cfg: ExperimentConfig, key: str, test_sets: Sequence[str], timesteps: Sequence[int]) -> dict[str, np.ndarray]:
    """{test set: (noise seeds, n)} L_Simple of the stored LoRA model ``key`` (noise seeds 10000 + s, as the UNet path)."""
    model = LatentModel(run, cfg, key)
    out = {}
    for test_set in test_sets:
        x = torch.from_numpy(run.read_array(run.GEN if test_set == "gen" else f"{run.INDICES}/{test_set}_images"))
        out[test_set] = np.stack([model.outputs(test_set, x, timesteps, 10_000 + ns).numpy() for ns in range(cfg.lds.noise_seeds)])
    return out


class LatentModel:
    """A stored LoRA model, ready for ground truth and features on a run's splits (latents cached)."""

    def __init__(self, run: RunStore, cfg: ExperimentConfig, key: str):
        self.run, self.cfg = run, cfg
        self.stack, self.digest = load_stack(run, cfg, key)
        self.embeddings = sd.encode_prompts(self.stack, captions(run))
        self._latents: dict[str, torch.Tensor] = {}

    def latents(self, split: str, images: torch.Tensor) -> torch.Tensor:
        if split not in self._latents:
            self._latents[split] = sd.encode_images(self.stack, images)
        return self._latents[split]

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.stack.unet.parameters() if p.requires_grad)

    def outputs(self, split: str, images: torch.Tensor, timesteps: Sequence[int], noise_seed: int) -> torch.Tensor:
        x = self.latents(split, images)
        return sd.latent_outputs(self.stack, x, labels_of(self.run, split, x.shape[0]), self.embeddings, range(x.shape[0]), timesteps, noise_seed)

    def features(
        self, split: str, images: torch.Tensor, rows: Sequence[int], projector: Projector, f: str, grids: Mapping[int, Sequence[int]],
        noise_seed: int, scheme: str, micro_batch: int,
    ) -> dict[int, torch.Tensor]:
        x = self.latents(split, images)
        labels = labels_of(self.run, split, x.shape[0])
        idx = torch.as_tensor(list(rows))
        return sd.latent_features(self.stack, projector, x[idx], labels[idx], self.embeddings, list(rows), f, grids, noise_seed, scheme, micro_batch)
