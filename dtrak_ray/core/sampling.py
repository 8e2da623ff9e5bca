"""DDIM sampling of the "Gen" test set; image i depends only on (seed, i)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from dtrak_ray.core.diffusion import keyed_noise, make_ddim


@torch.no_grad()
def ddim_sample(
    model: torch.nn.Module,
    ddpm: DDPMScheduler,
    shape: tuple[int, int, int],
    indices: list[int],
    seed: int,
    steps: int = 50,
    eta: float = 0.0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Generate one image per index (n, C, H, W) in [-1, 1]; with eta = 0 the map is deterministic."""
    model.eval()
    out = []
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        sched = make_ddim(ddpm)
        sched.set_timesteps(steps)
        # Keyed start noise: regenerating image i alone (counterfactuals) gives the same image.
        x = keyed_noise(shape, seed, -1, idx)
        for t in sched.timesteps:
            eps = model(x, t.expand(x.shape[0])).sample
            x = sched.step(eps, t, x, eta=eta).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)
