"""The paper's training recipe for a DDPM noise predictor, as a pure function (SPEC.md section 4).

AdamW, cosine learning-rate schedule with linear warmup (diffusers), gradient-norm clipping,
optional random horizontal flips, L_Simple loss with uniform timesteps; all randomness comes from
one explicit seed, so a model is a function of (data, recipe, seed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup

from dtrak_ray.core.diffusion import add_noise


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


def total_steps(n_images: int, recipe: Recipe) -> int:
    """Optimizer steps for ``recipe.epochs`` epochs over ``n_images`` (last batch kept)."""
    return recipe.epochs * math.ceil(n_images / recipe.batch_size)


def train_ddpm(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    recipe: Recipe,
    seed: int,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place on ``images`` (n, C, H, W) in [-1, 1]; returns the loss per epoch."""
    if images.shape[0] == 0:
        raise ValueError("no training images")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    steps = total_steps(images.shape[0], recipe)
    lr_sched = get_cosine_schedule_with_warmup(opt, int(recipe.warmup_fraction * steps), steps)
    T = scheduler.config.num_train_timesteps
    model.train()
    # Dropout draws from torch's global generator: seed it too so the model is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        losses: list[float] = []
        step = 0
        for _ in range(recipe.epochs):
            perm = torch.randperm(images.shape[0], generator=g)
            epoch_loss = 0.0
            for start in range(0, images.shape[0], recipe.batch_size):
                x = images[perm[start : start + recipe.batch_size]]
                if recipe.random_flip:
                    flip = torch.rand(x.shape[0], generator=g) < 0.5
                    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
                eps = torch.randn(x.shape, generator=g)
                t = torch.randint(0, T, (x.shape[0],), generator=g)
                loss = torch.nn.functional.mse_loss(model(add_noise(scheduler, x, eps, t), t).sample, eps)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
                opt.step()
                lr_sched.step()
                step += 1
                epoch_loss += loss.item() * x.shape[0]
                if on_step is not None:
                    on_step(step, steps, loss.item())
            losses.append(epoch_loss / images.shape[0])
    model.eval()
    return losses
