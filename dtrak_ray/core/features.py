"""Projected features of a block of rows: micro-batched per-sample gradients, then projection.

``project_rows`` is what a featurizer actor runs on one shard. Every micro-batch is padded to
exactly ``micro_batch`` samples (padding rows are computed and dropped), so each sample's numbers
come from a computation of the same shape wherever its shard starts or ends: features are
bit-identical whatever the shard size or worker count. Changing ``micro_batch`` itself changes
only float32 rounding (about 1e-7 relative).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dtrak_ray.core.diffusion import NoiseScheme
from dtrak_ray.core.gradients import GradientComputer
from dtrak_ray.core.projectors import Projector


def project_rows(
    gc: GradientComputer,
    projector: Projector,
    x: torch.Tensor,
    indices: Sequence[int],
    f: str,
    grids: Mapping[int, Sequence[int]],
    noise_seed: int,
    scheme: NoiseScheme,
    micro_batch: int,
) -> dict[int, torch.Tensor]:
    """``{K: (n, k)}`` features phi = P^T g of the rows ``x`` (n, C, H, W) with sample ``indices``."""
    if len(indices) != x.shape[0]:
        raise ValueError(f"indices has {len(indices)} entries for {x.shape[0]} rows")
    out: dict[int, list[torch.Tensor]] = {K: [] for K in grids}
    for start in range(0, x.shape[0], micro_batch):
        xb, ib = x[start : start + micro_batch], list(indices[start : start + micro_batch])
        n = xb.shape[0]
        if n < micro_batch:  # pad with copies of the last row, dropped below
            xb = torch.cat([xb, xb[-1:].expand(micro_batch - n, *xb.shape[1:])])
            ib = ib + [ib[-1]] * (micro_batch - n)
        grads = gc.averaged(xb, ib, f, grids, noise_seed, scheme)
        for K, g in grads.items():
            out[K].append(projector.project(g)[:n].cpu())  # project the full padded batch: same GEMM shape every time
    return {K: torch.cat(parts) for K, parts in out.items()}
