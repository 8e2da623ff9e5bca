"""Ground-truth model outputs for LDS: L_Simple averaged over a timestep grid and keyed noise.

Always L_Simple, whatever output function built the features (SPEC.md section 3). Forward passes
only; (sample, timestep) pairs are batched for throughput.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDPMScheduler

from dtrak_ray.core.diffusion import add_noise, keyed_noise


@torch.no_grad()
def l_simple_outputs(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    x: torch.Tensor,
    indices: Sequence[int],
    timesteps: Sequence[int],
    noise_seed: int,
    batch_size: int = 1024,
) -> torch.Tensor:
    """(n,) mean over ``timesteps`` of mean_d (eps_theta(x_t, t) - eps)^2, noise keyed by (seed, t, index)."""
    model.eval()
    n = x.shape[0]
    total = torch.zeros(n, dtype=torch.float64)
    per_t = max(1, batch_size // max(n, 1))
    for start in range(0, len(timesteps), per_t):
        ts = list(timesteps[start : start + per_t])
        eps = torch.cat([keyed_noise(x.shape[1:], noise_seed, t, indices) for t in ts])
        tt = torch.tensor(ts).repeat_interleave(n)
        x0 = x.repeat(len(ts), 1, 1, 1)
        dev = next(model.parameters()).device  # noise is drawn on the CPU (keyed), the forward runs where the model is
        xt = add_noise(scheduler, x0, eps, tt)
        pred = torch.cat([model(xb.to(dev), tb.to(dev)).sample.cpu() for xb, tb in zip(xt.split(batch_size), tt.split(batch_size), strict=True)])
        err = ((pred - eps) ** 2).flatten(1).mean(1).double()
        total += err.view(len(ts), n).sum(0)
    return (total / len(timesteps)).float()
