"""Mixed-precision training (the paper's fp16 for SD + LoRA) against float32, on the CPU's autocast.

The same code path runs on a GPU; here autocast runs on the CPU, which supports fp16 and bf16. The
independent computation is the float32 run of the same recipe and seed: the mixed-precision run
must follow it closely without being identical (so autocast really ran), keep its weights in
float32, and resume exactly from a checkpoint, gradient scaler included.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dtrak_ray.core.diffusion import make_scheduler
from dtrak_ray.core.models import build_unet
from dtrak_ray.core.training import Recipe, TrainState, precision, train_ddpm
from dtrak_ray.data import load_digits_2
from tests.conftest import TINY_MODEL

RECIPE = Recipe(3, 8, 1e-3, (0.95, 0.999), 0.0, 0.1, 1.0, True)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.from_numpy(load_digits_2((0, 1)).images[:16])


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(images: torch.Tensor, mp: str, **kw) -> tuple[torch.nn.Module, list[float]]:
    model = build_unet(0, **TINY_MODEL)
    losses = train_ddpm(model, make_scheduler(), images, dataclasses.replace(RECIPE, mixed_precision=mp), seed=1, **kw)
    return model, losses


@pytest.mark.parametrize(("mp", "tolerance"), [("fp16", 0.1), ("bf16", 0.25)])
def test_mixed_precision_follows_float32(images, mp, tolerance):
    start = _flat(build_unet(0, **TINY_MODEL))
    ref_model, ref_losses = _train(images, "no")
    model, losses = _train(images, mp)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights stay float32
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-2, atol=0)
    # Distance from the float32 weights, relative to how far training moved them.
    drift = float((_flat(model) - _flat(ref_model)).norm() / (_flat(ref_model) - start).norm())
    assert 0 < drift < tolerance, drift


def test_fp16_resume_is_exact_with_the_scaler_state(images):
    states: list[TrainState] = []
    whole, _ = _train(images, "fp16", checkpoint_every=1, on_checkpoint=states.append)
    assert [s.epoch for s in states] == [1, 2, 3]
    assert states[0].scaler and states[0].scaler["scale"] > 1  # the gradient scaler ran and is checkpointed
    resumed, _ = _train(images, "fp16", resume=TrainState.from_dict(states[0].to_dict()))
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters(), strict=True))


def test_precision_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        precision(dataclasses.replace(RECIPE, mixed_precision="fp8"), torch.device("cpu"))
    _, scaler = precision(RECIPE, torch.device("cpu"))
    assert not scaler.is_enabled()
