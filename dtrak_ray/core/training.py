"""The paper's training recipe for a DDPM noise predictor, as a pure function (SPEC.md section 4).

AdamW, cosine learning-rate schedule with linear warmup (diffusers), gradient-norm clipping,
optional random horizontal flips, L_Simple loss with uniform timesteps; all randomness comes from
one explicit seed, so a model is a function of (data, recipe, seed).

Checkpoint and resume: every random draw of epoch ``e`` (data order, flips, noise, timesteps, and
dropout, which draws from torch's global generator) comes from generators seeded by
``mix_seed(seed, e, stream)``. The random state at an epoch boundary is therefore a function of
(seed, epoch) alone, and a run resumed from a :class:`TrainState` taken at the end of epoch ``e``
(model, optimizer and LR-scheduler state, step, losses) continues exactly as the uninterrupted run
would have: the tests check equality of the final weights.

Mixed precision (``Recipe.mixed_precision``, the paper's fp16 for Stable Diffusion + LoRA): the
forward runs under ``torch.autocast`` in fp16 or bf16 while the weights, optimizer and loss stay
float32; fp16 adds a gradient scaler (:func:`precision`), whose state is part of the checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup

from dtrak_ray.core.diffusion import mix_seed

# Streams of the per-epoch generators: one for the data pipeline, one for dropout.
_DATA_STREAM, _DROPOUT_STREAM = 0, 1


@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters (mirrors ``TrainConfig``)."""

    epochs: int
    batch_size: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_fraction: float
    grad_clip: float
    random_flip: bool
    mixed_precision: str = "no"  # "no", "fp16" (autocast + gradient scaler) or "bf16" (autocast)


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def precision(recipe: Recipe, device: torch.device) -> tuple[Callable[[], AbstractContextManager], torch.amp.GradScaler]:
    """The forward's autocast context (a factory) and the gradient scaler of ``recipe.mixed_precision``.

    Both are no-ops for "no". Autocast runs on the model's device type, a CPU too (slow in fp16, but
    the same code path as on a GPU, which is how the tests check it).
    """
    if recipe.mixed_precision not in ("no", *AUTOCAST_DTYPES):
        raise ValueError(f"mixed_precision={recipe.mixed_precision!r}: use no, fp16 or bf16")
    dtype = AUTOCAST_DTYPES.get(recipe.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return (lambda: torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)), scaler


@dataclass
class TrainState:
    """Everything needed to resume training after ``epoch`` completed epochs.

    The random-number state is not stored: it is re-derived from (seed, epoch), see the module
    docstring; ``seed`` is recorded so a checkpoint is never resumed under another seed.
    """

    epoch: int
    step: int
    seed: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    scaler: dict[str, Any] = field(default_factory=dict)  # the fp16 gradient scaler's state (empty otherwise)

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping for ``torch.save`` (the model weights are saved separately by the caller if wanted)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "model": self.model,
                "optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler, "losses": list(self.losses),
                "scaler": self.scaler}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(d["epoch"], d["step"], d["seed"], d["model"], d["optimizer"], d["lr_scheduler"], list(d["losses"]), d.get("scaler", {}))


def total_steps(n_images: int, recipe: Recipe) -> int:
    """Optimizer steps for ``recipe.epochs`` epochs over ``n_images`` (last batch kept)."""
    return recipe.epochs * math.ceil(n_images / recipe.batch_size)


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """Seed of one random stream of one epoch (63-bit hash, folded into torch's seed range)."""
    return mix_seed(seed, epoch, stream) % (2**63 - 1)


def train_ddpm(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    recipe: Recipe,
    seed: int,
    on_step: Callable[[int, int, float], None] | None = None,
    resume: TrainState | None = None,
    checkpoint_every: int | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    cond: torch.Tensor | None = None,
    flipped: torch.Tensor | None = None,
) -> list[float]:
    """Train ``model``'s trainable parameters in place on ``images`` (n, C, H, W); returns the loss per epoch.

    ``resume``: a state taken after some epoch of the same (images, recipe, seed); training
    continues from there. ``on_checkpoint(state)`` is called after every ``checkpoint_every``-th
    epoch and after the last one; its ``model`` holds the trainable parameters only (for LoRA, the
    adapters). The model may live on a GPU: random draws are made on the CPU and moved, so a model
    does not depend on the device that trained it beyond float rounding.

    Latent diffusion (Stable Diffusion + LoRA) uses the same loop: ``images`` are latents,
    ``cond`` the per-sample (n, seq, dim) caption embeddings passed as ``encoder_hidden_states``,
    and ``flipped`` the latents of the flipped images, taken where a flip is drawn (a flip of an
    image is not a flip of its latent).
    """
    if images.shape[0] == 0:
        raise ValueError("no training images")
    if resume is not None and resume.seed != seed:
        raise ValueError(f"checkpoint was made with seed {resume.seed}, not {seed}: it cannot be resumed here")
    device = next(model.parameters()).device
    images = images.to(device)
    cond = cond.to(device) if cond is not None else None
    flipped = flipped.to(device) if flipped is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    steps = total_steps(images.shape[0], recipe)
    lr_sched = get_cosine_schedule_with_warmup(opt, int(recipe.warmup_fraction * steps), steps)
    autocast, scaler = precision(recipe, device)
    losses: list[float] = []
    step, first_epoch = 0, 0
    if resume is not None:
        missing = set(model.load_state_dict(resume.model, strict=False).missing_keys)
        if missing & {n for n, p in model.named_parameters() if p.requires_grad}:
            raise ValueError(f"checkpoint lacks trainable parameters {sorted(missing)[:3]}: it is of another model")
        opt.load_state_dict(resume.optimizer)
        lr_sched.load_state_dict(resume.lr_scheduler)
        if resume.scaler:
            scaler.load_state_dict(resume.scaler)
        step, first_epoch, losses = resume.step, resume.epoch, list(resume.losses)
    T = scheduler.config.num_train_timesteps
    abar = scheduler.alphas_cumprod.to(device=device, dtype=images.dtype)
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for epoch in range(first_epoch, recipe.epochs):
            g = torch.Generator().manual_seed(epoch_seed(seed, epoch, _DATA_STREAM))
            # Dropout draws from torch's global generator: reseed it per epoch so a resume is exact.
            torch.manual_seed(epoch_seed(seed, epoch, _DROPOUT_STREAM))
            perm = torch.randperm(images.shape[0], generator=g)
            epoch_loss = 0.0
            for start in range(0, images.shape[0], recipe.batch_size):
                idx = perm[start : start + recipe.batch_size].to(device)
                x = images[idx]
                if recipe.random_flip:
                    flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(device)
                    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1) if flipped is None else flipped[idx], x)
                eps = torch.randn(x.shape, generator=g).to(device)
                t = torch.randint(0, T, (x.shape[0],), generator=g).to(device)
                a = abar[t].view(-1, 1, 1, 1)  # the same arithmetic as core.diffusion.add_noise, on the model's device
                kwargs = {} if cond is None else {"encoder_hidden_states": cond[idx]}
                with autocast():
                    pred = model(a.sqrt() * x + (1 - a).sqrt() * eps, t, **kwargs).sample
                loss = torch.nn.functional.mse_loss(pred.float(), eps)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                scaler.step(opt)
                scaler.update()
                lr_sched.step()
                step += 1
                epoch_loss += loss.item() * x.shape[0]
                if on_step is not None:
                    on_step(step, steps, loss.item())
            losses.append(epoch_loss / images.shape[0])
            last = epoch + 1 == recipe.epochs
            if on_checkpoint is not None and checkpoint_every and ((epoch + 1) % checkpoint_every == 0 or last):
                model.eval()
                # Copies: the live optimizer state is updated in place by the next step.
                state = TrainState(epoch + 1, step, seed, _trainable(model), copy.deepcopy(opt.state_dict()),
                                   copy.deepcopy(lr_sched.state_dict()), list(losses),
                                   scaler.state_dict() if scaler.is_enabled() else {})
                on_checkpoint(state)
                model.train()
    model.eval()
    return losses


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters (all of a UNet's; the adapters of a LoRA model)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
