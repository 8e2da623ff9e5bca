"""DDPM pieces shared by training, features and ground truth: scheduler, timestep grids, keyed noise.

Noise is keyed rather than drawn from a stream: the draw for (seed, t, sample index) is the same
whatever the batch, shard or worker that computes it (SPEC.md section 2), so features and
ground-truth outputs do not depend on how the work was split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler

NoiseScheme = Literal["per-sample", "shared"]

_MASK64 = (1 << 64) - 1


def mix_seed(*keys: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 steps): distinct keys give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for key in keys:
        h = (h ^ (int(key) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def make_scheduler(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DDPMScheduler:
    """The paper's DDPM scheduler: linear betas, epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
    )


def make_ddim(ddpm: DDPMScheduler) -> DDIMScheduler:
    """A DDIM sampler over the same noise schedule (the paper samples its Gen set with DDIM)."""
    return DDIMScheduler.from_config(ddpm.config)


def timestep_grid(K: int, num_train_timesteps: int = 1000, strategy: str = "uniform", seed: int = 0) -> list[int]:
    """K timesteps at which gradients are taken.

    - uniform (the paper's): ``range(0, T, T // K)``, K timesteps when K divides T;
    - cumulative: the first K timesteps, ``range(K)`` (the authors' other option);
    - random: K distinct timesteps drawn with ``seed``, sorted.
    Uniform and cumulative grids of smaller K are subsets of larger ones when K divides K'.
    """
    if not 1 <= K <= num_train_timesteps:
        raise ValueError(f"K={K} must be in 1..{num_train_timesteps}")
    if strategy == "uniform":
        return list(range(0, num_train_timesteps, num_train_timesteps // K))[:K]
    if strategy == "cumulative":
        return list(range(K))
    if strategy == "random":
        g = torch.Generator().manual_seed(mix_seed(seed, K))
        return sorted(torch.randperm(num_train_timesteps, generator=g)[:K].tolist())
    raise ValueError(f"unknown timestep strategy {strategy!r}: use uniform, cumulative or random")


def keyed_noise(
    shape: Sequence[int], seed: int, t: int, indices: Sequence[int], scheme: NoiseScheme = "per-sample"
) -> torch.Tensor:
    """Noise of shape (len(indices), *shape): row i depends only on (seed, t, indices[i]).

    ``shared`` gives every sample the draw keyed by (seed, t) alone (one draw per timestep).
    """
    if scheme == "shared":
        g = torch.Generator().manual_seed(mix_seed(seed, t))
        one = torch.randn(tuple(shape), generator=g)
        return one.expand(len(indices), *shape).clone()
    if scheme != "per-sample":
        raise ValueError(f"unknown noise scheme {scheme!r}: use 'per-sample' or 'shared'")
    out = torch.empty(len(indices), *shape)
    g = torch.Generator()
    for row, idx in enumerate(indices):
        g.manual_seed(mix_seed(seed, t, int(idx)))
        out[row] = torch.randn(tuple(shape), generator=g)
    return out


def add_noise(scheduler: DDPMScheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, with t of shape (B,)."""
    abar = scheduler.alphas_cumprod.to(x0.dtype)[t].view(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def elbo_weight(scheduler: DDPMScheduler, t: torch.Tensor) -> torch.Tensor:
    """w_t = beta_t / (2 alpha_t (1 - abar_t)), the ELBO weight of L_Simple at step t."""
    # Recompute abar in float64: at t = 0, 1 - abar is ~1e-4 and float32 loses 4 digits of it.
    betas = scheduler.betas.to(torch.float64)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    return (betas[t] / (2 * alphas[t] * (1 - abar[t]))).to(torch.float32)
