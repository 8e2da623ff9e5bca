"""What several stages share: the stage interface, the run context, model and image I/O."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from diffusers import DDPMScheduler, UNet2DModel
from rich.console import Console

from dtrak_ray import __version__
from dtrak_ray.config import ExperimentConfig, parse_config
from dtrak_ray.core.diffusion import make_scheduler, mix_seed
from dtrak_ray.core.models import build_unet, unet_kwargs, use_plain_attention
from dtrak_ray.core.training import Recipe
from dtrak_ray.distributed.cluster import Resources
from dtrak_ray.errors import ConfigError, CorruptArtifactError
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


def device_of(cfg: ExperimentConfig) -> torch.device:
    """The device a worker computes on: its GPU when the config asks for GPUs and one is visible."""
    return torch.device("cuda" if cfg.resources.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")


def recipe_of(cfg: ExperimentConfig) -> Recipe:
    t = cfg.train
    return Recipe(
        t.epochs, t.batch_size, t.lr, tuple(t.betas), t.weight_decay, t.warmup_fraction, t.grad_clip, t.random_flip, t.mixed_precision
    )


def new_model(cfg: ExperimentConfig, seed: int) -> UNet2DModel:
    if cfg.model.kind == "sd-lora":  # the pretrained UNet with fresh LoRA adapters (stages/sd_lora.py)
        from dtrak_ray.stages import sd_lora

        return sd_lora.new_unet(cfg, seed)
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
    """The model stored at ``key`` in eval mode, and a digest of its weights (for provenance).

    A checkpoint whose architecture differs from the run's config, or whose weights do not fit its
    own config.json, is refused with a message naming the differing fields (not a state-dict error).
    """
    from dtrak_ray.stages import sd_lora

    if sd_lora.is_lora_model(run, key):  # Stable Diffusion + LoRA: the UNet with the stored adapters
        stack, digest = sd_lora.load_stack(run, sd_lora.run_config(run), key)
        return stack.unet, digest
    with tempfile.TemporaryDirectory() as tmp:
        path = run.local_dir(key, tmp)
        check_architecture(run, key, path)
        try:
            model = UNet2DModel.from_pretrained(str(path))
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise CorruptArtifactError(
                f"checkpoint {run.url(key)} cannot be loaded ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}): "
                "its weights do not fit its config.json, or a file is damaged. Retrain it: delete it and "
                f"{run.url('_markers/stages/train.json')}, then rerun `dtrak-ray train`"
            ) from None
        digest = hashlib.sha256((path / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:16]
    return use_plain_attention(model).eval(), digest


_ARCHITECTURE_FIELDS = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                        "up_block_types", "norm_num_groups", "resnet_time_scale_shift")


def check_architecture(run: RunStore, key: str, path: Path) -> None:
    """Refuse a checkpoint whose config.json describes another UNet than the run's config.yaml."""
    if not run.exists(run.CONFIG) or not (path / "config.json").is_file():
        return
    try:
        cfg = parse_config(yaml.safe_load(run.read_text(run.CONFIG)), source=run.url(run.CONFIG))
        expected = unet_kwargs(**cfg.model.model_dump())
        stored = json.loads((path / "config.json").read_text())
    except (ConfigError, TypeError, ValueError):  # not a plain UNet config (e.g. Stable Diffusion + LoRA): nothing to compare
        return
    norm = json.dumps
    diff = [f for f in _ARCHITECTURE_FIELDS if f in stored and norm(list(expected[f]) if isinstance(expected[f], tuple) else expected[f])
            != norm(stored[f])]
    if diff:
        details = "; ".join(f"{f}: {stored[f]} in the checkpoint, {list(expected[f]) if isinstance(expected[f], tuple) else expected[f]} "
                            "in the config" for f in diff)
        raise CorruptArtifactError(
            f"checkpoint {run.url(key)} does not match the run's model config ({details}): it was trained with another "
            "model section (copied from another run, or the config was edited). Use the model config it was made with, "
            f"or retrain: delete {run.url('models')} and {run.url('_markers/stages/train.json')}, then rerun `dtrak-ray train`"
        )


def load_images(run: RunStore, split: str) -> torch.Tensor:
    """Images of a split: ``train`` and ``val`` from the data stage, ``gen`` from generation."""
    key = run.GEN if split == "gen" else f"{run.INDICES}/{split}_images"
    return torch.from_numpy(run.read_array(key))


def provenance(cfg: ExperimentConfig, **extra: Any) -> dict[str, Any]:
    """Attributes every array carries: what made it."""
    return {"code_version": __version__, "run": cfg.name, "dataset": cfg.data.dataset, **extra}


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()
