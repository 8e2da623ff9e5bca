"""What the LDS ground truth will cost, estimated from a short measured run (SPEC.md sections 3, 4, 6).

The ground truth dominates a reproduction: M subsets x seeds retrained models, then L_Simple of
each on every test image at every timestep of the grid and every noise seed. This module counts
that work for a config (:func:`workload_of`) or for the paper's CIFAR-2 setting
(:func:`paper_cifar2`), times a few training steps and forward passes of the same model on the
device the workers would use (:func:`measure`), and multiplies (:func:`estimate`).

Counting (``alpha N`` rounded per class is approximated by ``round(alpha N)``):
- models = M x seeds (+ counterfactual: n_images x methods, on N - k images);
- steps per model = epochs x ceil(alpha N / batch) (the paper gives 4000 steps directly);
- forward passes = models x timesteps x noise seeds x (n_val + n_gen), one image and timestep each;
- device-seconds = steps x (seconds per training step at the batch size) + forwards x (seconds per
  forward pass per image), summed over models; wall time divides by the number of workers.
On a CPU the probe batch is cut so that a large model is measured in seconds, and the time is
scaled linearly to the configured batch (CPU throughput is close to linear in the batch size).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from dtrak_ray.config import ExperimentConfig

# The paper's CIFAR-2 setting (SPEC.md section 4): the google/ddpm-cifar10-32 UNet (38.3M parameters),
# 64 subsets x 3 seeds, 4000 steps at batch 128, outputs over 1000 timesteps x 3 noise seeds on
# 1000 Val + 1000 Gen images.
PAPER_CIFAR2_MODEL: dict[str, Any] = dict(
    sample_size=32, channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2, attention_levels=(1,),
    norm_num_groups=32, dropout=0.1, resnet_time_scale_shift="scale_shift",
)


@dataclass(frozen=True)
class Workload:
    """The work of a ground truth, in counts."""

    name: str
    n_params: int
    models: int
    steps_per_model: int
    batch_size: int
    timesteps: int
    noise_seeds: int
    n_test: int
    counterfactual_models: int = 0
    counterfactual_steps_per_model: int = 0
    note: str = ""  # what was timed, where it is not the configured model itself

    @property
    def train_steps(self) -> int:
        return self.models * self.steps_per_model + self.counterfactual_models * self.counterfactual_steps_per_model

    @property
    def forward_passes(self) -> int:
        return self.models * self.timesteps * self.noise_seeds * self.n_test


@dataclass(frozen=True)
class Timing:
    """Measured speed of one model on one device."""

    device: str
    seconds_per_step: float  # one optimizer step at the workload's batch size
    seconds_per_forward: float  # one image at one timestep, forward only (batched)
    probe_batch: int  # the batch actually timed (scaled linearly to the workload's batch)


@dataclass(frozen=True)
class Estimate:
    """Hours of device time (one device) and of wall time (``workers`` devices in parallel)."""

    workload: Workload
    timing: Timing
    workers: int

    @property
    def train_hours(self) -> float:
        return self.workload.train_steps * self.timing.seconds_per_step / 3600

    @property
    def output_hours(self) -> float:
        return self.workload.forward_passes * self.timing.seconds_per_forward / 3600

    @property
    def device_hours(self) -> float:
        return self.train_hours + self.output_hours

    @property
    def wall_hours(self) -> float:
        return self.device_hours / max(1, self.workers)


def steps_per_model(n_images: int, epochs: int, batch_size: int) -> int:
    """Optimizer steps of the recipe on ``n_images`` (the last partial batch counts)."""
    return epochs * math.ceil(n_images / batch_size)


def workload_of(cfg: ExperimentConfig, n_train: int, n_val: int, n_params: int) -> Workload:
    """The ground-truth (and counterfactual) work of a config whose training set has ``n_train`` images."""
    t, lds, c = cfg.train, cfg.lds, cfg.counterfactual
    n_sub = round(lds.alpha * n_train)
    k = c.top_k if c.top_k is not None else max(1, round(c.top_fraction * n_train))
    return Workload(
        name=cfg.name, n_params=n_params, models=lds.num_subsets * lds.seeds,
        steps_per_model=steps_per_model(n_sub, t.epochs, t.batch_size), batch_size=t.batch_size,
        timesteps=lds.output_timesteps, noise_seeds=lds.noise_seeds, n_test=n_val + cfg.generate.n_samples,
        counterfactual_models=c.n_images * len(c.methods),
        counterfactual_steps_per_model=steps_per_model(max(n_train - k, 1), t.epochs, t.batch_size) if c.n_images else 0,
    )


def paper_cifar2(n_params: int = 38_306_691) -> Workload:
    """The paper's CIFAR-2 ground truth: 64 subsets x 3 seeds, 4000 steps at batch 128, 1000 timesteps x
    3 noise seeds on 2000 test images (no counterfactual study)."""
    return Workload("paper CIFAR-2", n_params, models=64 * 3, steps_per_model=4000, batch_size=128,
                    timesteps=1000, noise_seeds=3, n_test=2000)


def probe_batch(batch_size: int, n_params: int, device: str) -> int:
    """The batch timed: the full batch on a GPU; on a CPU about 16M parameter-samples per step (seconds)."""
    if device != "cpu":
        return batch_size
    return max(1, min(batch_size, int(16e6 // max(n_params, 1))))


def measure(model: torch.nn.Module, batch_size: int, device: str = "cpu", steps: int = 2, threads: int | None = None) -> Timing:
    """Time ``steps`` training steps (after one warm-up) and forward passes of ``model`` on ``device``.

    A training step is the recipe's: noisy input, MSE on the noise, backward, clipping, AdamW.
    The returned seconds are per step at ``batch_size`` and per image forward pass.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model = model.to(device).train()
        n_params = sum(p.numel() for p in model.parameters())
        b = probe_batch(batch_size, n_params, device)
        config = model.unet.config if hasattr(model, "unet") else model.config  # a PromptConditioned SD UNet, or a UNet2DModel
        shape = (b, config.in_channels, config.sample_size, config.sample_size)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(device)
        t = torch.randint(0, 1000, (b,), generator=g).to(device)
        params = [p for p in model.parameters() if p.requires_grad]  # the LoRA weights only, for SD + LoRA
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            loss = torch.nn.functional.mse_loss(model(x, t).sample, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        def sync() -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        step()  # warm-up: allocator, kernels, first-touch of the optimizer state
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        per_step = (time.perf_counter() - t0) / steps * batch_size / b
        model.eval()
        fb = max(b, 2)
        xf = torch.randn((fb, *shape[1:]), generator=g).to(device)
        tf = torch.randint(0, 1000, (fb,), generator=g).to(device)
        with torch.no_grad():
            model(xf, tf)
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                model(xf, tf)
            sync()
            per_forward = (time.perf_counter() - t0) / steps / fb
    finally:
        torch.set_num_threads(old_threads)
    return Timing(device=device, seconds_per_step=per_step, seconds_per_forward=per_forward, probe_batch=b)


def estimate(workload: Workload, timing: Timing, workers: int = 1) -> Estimate:
    """Device and wall hours of ``workload`` at the measured speed, on ``workers`` devices in parallel."""
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    return Estimate(workload, timing, workers)


def configured_device(cfg: ExperimentConfig) -> str:
    """The device the config's workers train on: a GPU when it asks for GPUs and one is visible."""
    from dtrak_ray.stages.common import device_of  # imported late, like the other stage helpers here

    return device_of(cfg).type


def configured_workers(cfg: ExperimentConfig) -> int:
    """Workers of a local run: ``resources.num_workers``, else CPUs (or visible GPUs) per worker size."""
    import os

    r = cfg.resources
    if r.num_workers:
        return r.num_workers
    if r.gpus_per_worker > 0 and torch.cuda.is_available():
        return max(1, int(torch.cuda.device_count() // r.gpus_per_worker))
    return max(1, int((os.cpu_count() or 1) // r.cpus_per_worker))


def dataset_sizes(cfg: ExperimentConfig) -> tuple[int, int]:
    """(n_train, n_val) of the config's split, from the dataset on this machine (nothing is downloaded)."""
    from dtrak_ray.data import load_dataset, split_indices
    from dtrak_ray.errors import ConfigError

    d = cfg.data
    try:
        ds = load_dataset(d.dataset, d.classes, path=getattr(d, "path", None), image_size=getattr(d, "image_size", None),
                          center_crop=getattr(d, "center_crop", None), download=False)
    except Exception as exc:  # noqa: BLE001 - any failure to read the dataset: fall back to the config's sizes
        if d.n_train is None:
            raise ConfigError(f"cannot size the cost estimate: dataset {d.dataset!r} is not readable here ({exc}); set data.n_train") from None
        return d.n_train, d.n_val
    train, val = split_indices(ds.labels, d.n_val, cfg.seed, d.n_train, getattr(ds, "pool", None))
    return len(train), len(val)


def timed_model(cfg: ExperimentConfig, stand_in: dict[str, Any] | None = None) -> tuple[torch.nn.Module, str]:
    """The model whose steps are timed for ``cfg``, and a note on what it is.

    A UNet is built from the config. For Stable Diffusion + LoRA, the pretrained UNet with fresh
    LoRA adapters, conditioned on a caption-sized embedding (77 x cross-attention width, as CLIP's
    text encoder gives); where ``model.pretrained`` is not on this machine, the miniSD (SD 1.x)
    architecture with random weights stands in (``stand_in``: another UNet2DConditionModel config):
    a step's time depends on the shapes, not the values.
    """
    from pathlib import Path

    from dtrak_ray.stages.common import new_model

    if cfg.model.kind != "sd-lora":
        return new_model(cfg, 0), ""
    from diffusers import UNet2DConditionModel

    from dtrak_ray.core import sd

    if (Path(cfg.model.pretrained) / "unet").is_dir():
        unet, note = new_model(cfg, 0), f"UNet of {cfg.model.pretrained}"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**(stand_in or sd.MINISD_UNET))
        sd.add_lora(unet, cfg.model.lora_rank, 0)
        note = f"{cfg.model.pretrained} not here: miniSD's architecture with random weights timed"
    width = unet.config.cross_attention_dim
    return sd.PromptConditioned(unet, torch.randn(77, width, generator=torch.Generator().manual_seed(0))), note


def estimate_config(cfg: ExperimentConfig, paper: bool = True) -> list[Estimate]:
    """Measure and estimate the config's ground truth and, with ``paper``, the paper's CIFAR-2 one, on the configured device.

    Parameters are the trainable ones (for SD + LoRA, the adapters), the ones features are taken wrt.
    """
    from dtrak_ray.core.models import build_unet

    device, workers, threads = configured_device(cfg), configured_workers(cfg), cfg.resources.torch_threads
    n_train, n_val = dataset_sizes(cfg)
    model, note = timed_model(cfg)
    work = workload_of(cfg, n_train, n_val, sum(p.numel() for p in model.parameters() if p.requires_grad))
    work = replace(work, note=note)
    out = [estimate(work, measure(model, cfg.train.batch_size, device, threads=threads), workers)]
    if paper:
        big = build_unet(0, **PAPER_CIFAR2_MODEL)
        work = paper_cifar2(sum(p.numel() for p in big.parameters()))
        out.append(estimate(work, measure(big, work.batch_size, device, steps=1, threads=threads), workers))
    return out


def describe(est: Estimate) -> dict[str, Any]:
    """The numbers of an estimate, for tables and JSON."""
    w, t = est.workload, est.timing
    return {
        "setting": w.name, "params_M": w.n_params / 1e6, "models": w.models + w.counterfactual_models,
        "steps_per_model": w.steps_per_model, "batch": w.batch_size, "train_steps": w.train_steps, "forward_passes": w.forward_passes,
        "device": t.device, "probe_batch": t.probe_batch, "s_per_step": t.seconds_per_step, "s_per_forward": t.seconds_per_forward,
        "train_hours": est.train_hours, "output_hours": est.output_hours, "device_hours": est.device_hours,
        "workers": est.workers, "wall_hours": est.wall_hours, "note": w.note,
    }


def with_workers(est: Estimate, workers: int) -> Estimate:
    """The same estimate on another number of devices."""
    return replace(est, workers=workers)


def cost_table(estimates: list[Estimate]) -> Any:
    """A rich table of estimates: one column per setting, one row per quantity (fits a narrow terminal)."""
    from rich.table import Table

    table = Table(title="Cost of the LDS ground truth (timed here, scaled by counting)")
    table.add_column("")
    for est in estimates:
        table.add_column(est.workload.name, justify="right")
    ds = [describe(e) for e in estimates]
    rows = [
        ("parameters", lambda d: f"{d['params_M']:.2f}M"),
        ("models to train", lambda d: f"{d['models']:,}"),
        ("steps per subset model", lambda d: f"{d['steps_per_model']:,} x batch {d['batch']}"),
        ("training steps", lambda d: f"{d['train_steps']:,}"),
        ("forward passes (outputs)", lambda d: f"{d['forward_passes']:,}"),
        ("device (probe batch)", lambda d: f"{d['device']} ({d['probe_batch']})"),
        ("s per step / per forward", lambda d: f"{d['s_per_step']:.3g} / {d['s_per_forward']:.3g}"),
        ("device-hours: train + outputs", lambda d: f"{d['train_hours']:,.3g} + {d['output_hours']:,.3g}"),
        ("device-hours", lambda d: f"{d['device_hours']:,.4g}"),
        ("wall-hours (workers)", lambda d: f"{d['wall_hours']:,.4g} ({d['workers']})"),
    ]
    for name, fmt in rows:
        table.add_row(name, *(fmt(d) for d in ds))
    notes = [f"{d['setting']}: {d['note']}" for d in ds if d["note"]]
    if notes:
        table.caption = "; ".join(notes)
    return table
