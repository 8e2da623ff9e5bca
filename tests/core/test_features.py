"""Features of a block of rows: invariant to how the rows are split into shards."""

from __future__ import annotations

import torch

from dtrak_ray.core.diffusion import make_scheduler, timestep_grid
from dtrak_ray.core.features import project_rows
from dtrak_ray.core.gradients import GradientComputer
from dtrak_ray.core.projectors import GaussianProjector, SJLTProjector


def test_features_bit_identical_across_shard_sizes(tiny_unet):
    gc = GradientComputer(tiny_unet, make_scheduler())
    x = torch.rand(11, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grids = {2: timestep_grid(2), 10: timestep_grid(10)}
    for proj in (GaussianProjector(gc.dim, 96, seed=1), SJLTProjector(gc.dim, 96, seed=1)):
        whole = project_rows(gc, proj, x, list(range(11)), "l_square", grids, 0, "per-sample", micro_batch=4)
        for bounds in ([0, 5, 11], [0, 1, 2, 7, 11], [0, 8, 11]):
            parts = [
                project_rows(gc, proj, x[a:b], list(range(a, b)), "l_square", grids, 0, "per-sample", micro_batch=4)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            for K in grids:
                assert torch.equal(torch.cat([p[K] for p in parts]), whole[K]), (bounds, K)


def test_micro_batch_changes_only_rounding(tiny_unet):
    gc = GradientComputer(tiny_unet, make_scheduler())
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    proj = GaussianProjector(gc.dim, 64, seed=0)
    a = project_rows(gc, proj, x, list(range(6)), "l_simple", {4: timestep_grid(4)}, 0, "shared", micro_batch=6)[4]
    b = project_rows(gc, proj, x, list(range(6)), "l_simple", {4: timestep_grid(4)}, 0, "shared", micro_batch=2)[4]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
