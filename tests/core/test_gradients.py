"""Per-sample gradients: vmap(grad) against a plain autograd loop, and invariances."""

from __future__ import annotations

import pytest
import torch

from dtrak_ray.core.diffusion import make_scheduler, timestep_grid
from dtrak_ray.core.gradients import GradientComputer, select_parameters
from dtrak_ray.core.outputs import OUTPUT_FUNCTIONS


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 1, 8, 8, generator=g) * 2 - 1


@pytest.mark.parametrize("f", sorted(OUTPUT_FUNCTIONS))
def test_vmap_matches_autograd_loop(tiny_unet, batch, f):
    gc = GradientComputer(tiny_unet, make_scheduler())
    grid = [0, 250, 500, 999]
    fast = gc.averaged(batch, [5, 6, 7], f, {4: grid}, noise_seed=1)[4].double()
    ref = gc.reference_averaged(batch, [5, 6, 7], f, grid, noise_seed=1)
    assert fast.shape == (3, gc.dim)
    scale = ref.abs().max()
    assert scale > 0
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5 * float(scale))


def test_gradients_do_not_depend_on_batching(tiny_unet, batch):
    gc = GradientComputer(tiny_unet, make_scheduler())
    grids = {2: timestep_grid(2), 4: timestep_grid(4)}
    together = gc.averaged(batch, [0, 1, 2], "l_square", grids, noise_seed=0)
    one_by_one = [gc.averaged(batch[i : i + 1], [i], "l_square", grids, noise_seed=0) for i in range(3)]
    for K in grids:
        torch.testing.assert_close(together[K], torch.cat([o[K] for o in one_by_one]), rtol=1e-5, atol=1e-7)


def test_nested_grids_equal_separate_passes(tiny_unet, batch):
    gc = GradientComputer(tiny_unet, make_scheduler())
    both = gc.averaged(batch, [0, 1, 2], "l_simple", {2: timestep_grid(2), 4: timestep_grid(4)}, noise_seed=0)
    only2 = gc.averaged(batch, [0, 1, 2], "l_simple", {2: timestep_grid(2)}, noise_seed=0)
    torch.testing.assert_close(both[2], only2[2])


def test_parameter_subset(tiny_unet, batch):
    names = [n for n, _ in tiny_unet.named_parameters() if n.startswith("conv_out")]
    gc = GradientComputer(tiny_unet, make_scheduler(), param_names=names)
    full = GradientComputer(tiny_unet, make_scheduler())
    sub = gc.averaged(batch, [0, 1, 2], "l_square", {2: [0, 500]}, noise_seed=0)[2]
    ref = full.averaged(batch, [0, 1, 2], "l_square", {2: [0, 500]}, noise_seed=0)[2]
    offset = sum(p.numel() for n, p in tiny_unet.named_parameters() if n not in names and list(dict(tiny_unet.named_parameters())).index(n) < list(dict(tiny_unet.named_parameters())).index(names[0]))
    assert sub.shape[1] == sum(p.numel() for n, p in tiny_unet.named_parameters() if n in names)
    torch.testing.assert_close(sub, ref[:, offset : offset + sub.shape[1]])
    with pytest.raises(ValueError, match="param_names"):
        GradientComputer(tiny_unet, make_scheduler(), param_names=["nope"])


def test_timestep_chunking_does_not_change_gradients(tiny_unet, batch):
    gc = GradientComputer(tiny_unet, make_scheduler())
    grids = {2: timestep_grid(2), 4: timestep_grid(4)}
    wide = gc.averaged(batch, [0, 1, 2], "l_2", grids, noise_seed=0, max_rows=512)
    narrow = gc.averaged(batch, [0, 1, 2], "l_2", grids, noise_seed=0, max_rows=1)
    for K in grids:
        # Only float32 summation order differs between the two.
        torch.testing.assert_close(wide[K], narrow[K], rtol=1e-4, atol=1e-5 * float(wide[K].abs().max()))


def test_select_parameters_by_pattern(tiny_unet):
    names = select_parameters(tiny_unet, ["conv_out.*", "time_embedding.linear_1.*"])
    assert names == ["time_embedding.linear_1.weight", "time_embedding.linear_1.bias", "conv_out.weight", "conv_out.bias"]
    assert select_parameters(tiny_unet, None) is None
    gc = GradientComputer(tiny_unet, make_scheduler(), names)
    assert gc.dim == sum(p.numel() for n, p in tiny_unet.named_parameters() if n in names)
    with pytest.raises(ValueError, match=r"patterns \['\*lora_\*'\] match no"):
        select_parameters(tiny_unet, ["conv_out.*", "*lora_*"])
