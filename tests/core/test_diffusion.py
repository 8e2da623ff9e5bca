"""Scheduler pieces, timestep grids, keyed noise, output functions."""

from __future__ import annotations

import pytest
import torch

from dtrak_ray.core.diffusion import add_noise, elbo_weight, keyed_noise, make_scheduler, mix_seed, timestep_grid
from dtrak_ray.core.outputs import OUTPUT_FUNCTIONS, get_output_function


def test_uniform_grid_is_the_papers():
    assert timestep_grid(10) == list(range(0, 1000, 100))
    assert timestep_grid(100) == list(range(0, 1000, 10))
    assert len(timestep_grid(1000)) == 1000
    assert set(timestep_grid(10)) <= set(timestep_grid(100))
    with pytest.raises(ValueError):
        timestep_grid(0)
    assert timestep_grid(5, strategy="cumulative") == [0, 1, 2, 3, 4]
    rnd = timestep_grid(10, strategy="random", seed=3)
    assert len(set(rnd)) == 10 and rnd == sorted(rnd) and rnd == timestep_grid(10, strategy="random", seed=3)
    assert rnd != timestep_grid(10, strategy="random", seed=4)
    with pytest.raises(ValueError, match="timestep strategy"):
        timestep_grid(10, strategy="log")


def test_keyed_noise_depends_only_on_key():
    a = keyed_noise((1, 4, 4), seed=1, t=10, indices=[3, 4, 5])
    b = keyed_noise((1, 4, 4), seed=1, t=10, indices=[5, 3])
    torch.testing.assert_close(a[2], b[0])
    torch.testing.assert_close(a[0], b[1])
    assert not torch.allclose(a[0], a[1])
    assert not torch.allclose(a[0], keyed_noise((1, 4, 4), seed=1, t=20, indices=[3])[0])
    shared = keyed_noise((1, 4, 4), seed=1, t=10, indices=[3, 4], scheme="shared")
    torch.testing.assert_close(shared[0], shared[1])
    with pytest.raises(ValueError, match="noise scheme"):
        keyed_noise((1,), 0, 0, [0], scheme="bogus")


def test_mix_seed_distinct():
    seeds = {mix_seed(0, t, i) for t in range(50) for i in range(50)}
    assert len(seeds) == 2500


def test_add_noise_and_elbo_weight_match_formulas():
    s = make_scheduler()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 500, 999])
    x, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    expect = abar[t].sqrt().view(-1, 1, 1, 1) * x + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(add_noise(s, x, eps, t), expect.float(), rtol=1e-5, atol=1e-6)
    w = betas[t] / (2 * (1 - betas[t]) * (1 - abar[t]))
    torch.testing.assert_close(elbo_weight(s, t), w.float())
    # DDPM's own add_noise agrees with ours.
    torch.testing.assert_close(add_noise(s, x, eps, t), s.add_noise(x, eps, t), rtol=1e-5, atol=1e-6)


def test_output_functions_values():
    pred = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])
    eps = torch.zeros_like(pred)
    w = torch.tensor(0.5)
    assert OUTPUT_FUNCTIONS["l_simple"](pred, eps, w).item() == pytest.approx(14 / 4)
    assert OUTPUT_FUNCTIONS["l_elbo"](pred, eps, w).item() == pytest.approx(7 / 4)
    assert OUTPUT_FUNCTIONS["l_square"](pred, eps, w).item() == pytest.approx(14 / 4)
    assert OUTPUT_FUNCTIONS["l_avg"](pred, eps, w).item() == pytest.approx(2 / 4)
    assert OUTPUT_FUNCTIONS["l_1"](pred, eps, w).item() == pytest.approx(6)
    assert OUTPUT_FUNCTIONS["l_2"](pred, eps, w).item() == pytest.approx(14**0.5)
    assert OUTPUT_FUNCTIONS["l_inf"](pred, eps, w).item() == pytest.approx(3)
    with pytest.raises(ValueError, match="unknown output function"):
        get_output_function("l_cubic")
