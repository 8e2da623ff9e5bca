"""What several stages share: the stage interface, the run context, model and image I/O."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from rich.console import Console

from dtrak_ray import __version__
from dtrak_ray.config import ExperimentConfig
from dtrak_ray.core.diffusion import make_scheduler, mix_seed
from dtrak_ray.core.models import build_unet, use_plain_attention
from dtrak_ray.core.training import Recipe
from dtrak_ray.distributed.cluster import Resources
from dtrak_ray.storage import RunStore

TEST_SETS = ("val", "gen")


@dataclass
class Context:
    """Everything a stage needs: the config, its run in the store, worker sizing, a console."""

    cfg: ExperimentConfig
    run: RunStore
    resources: Resources
    console: Console = field(default_factory=Console)
    digests: dict[str, str] = field(default_factory=dict)

    def log(self, msg: str) -> None:
        self.console.print(msg)


@dataclass(frozen=True)
class Stage:
    """A named step: the config sections it reads, the stages it follows, and its body."""

    name: str
    sections: tuple[str, ...]
    deps: tuple[str, ...]
    body: Any  # Callable[[Context, str], None]: (context, this stage's digest)
    help: str = ""


def scheduler_of(cfg: ExperimentConfig) -> DDPMScheduler:
    d = cfg.diffusion
    return make_scheduler(d.num_train_timesteps, d.beta_start, d.beta_end)


def recipe_of(cfg: ExperimentConfig) -> Recipe:
    t = cfg.train
    return Recipe(t.epochs, t.batch_size, t.lr, tuple(t.betas), t.weight_decay, t.warmup_fraction, t.grad_clip, t.random_flip)


def new_model(cfg: ExperimentConfig, seed: int) -> UNet2DModel:
    return build_unet(seed, **cfg.model.model_dump())


def model_seed(cfg: ExperimentConfig, subset: int | None, seed_index: int) -> int:
    """Seed of a model: the config seed for the base model, a derived one for subset models."""
    if subset is None and seed_index == 0:
        return cfg.seed
    return mix_seed(cfg.seed, -1 if subset is None else subset, seed_index) % (2**31)


def save_model(run: RunStore, key: str, model: UNet2DModel) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        run.put_dir(tmp, key)


def load_model(run: RunStore, key: str) -> tuple[UNet2DModel, str]:
    """The model stored at ``key`` in eval mode, and a digest of its weights (for provenance)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = run.local_dir(key, tmp)
        model = UNet2DModel.from_pretrained(str(path))
        digest = hashlib.sha256((path / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:16]
    return use_plain_attention(model).eval(), digest


def load_images(run: RunStore, split: str) -> torch.Tensor:
    """Images of a split: ``train`` and ``val`` from the data stage, ``gen`` from generation."""
    key = run.GEN if split == "gen" else f"{run.INDICES}/{split}_images"
    return torch.from_numpy(run.read_array(key))


def provenance(cfg: ExperimentConfig, **extra: Any) -> dict[str, Any]:
    """Attributes every array carries: what made it."""
    return {"code_version": __version__, "run": cfg.name, "dataset": cfg.data.dataset, **extra}


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()
