"""Training checkpoints: a resumed run equals an uninterrupted one, and a killed trainer resumes from its checkpoint."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from rich.console import Console

from dtrak_ray.config import parse_config
from dtrak_ray.core.diffusion import make_scheduler
from dtrak_ray.core.models import build_unet
from dtrak_ray.core.training import Recipe, TrainState, train_ddpm
from dtrak_ray.pipeline import run_pipeline, stage_digests
from dtrak_ray.stages.common import load_model
from dtrak_ray.stages.train import train_model
from dtrak_ray.storage import Store
from tests.conftest import TINY_MODEL, tiny_config_dict
from tests.ray.test_counterfactual import off_sections

RECIPE = Recipe(epochs=4, batch_size=8, lr=1e-3, betas=(0.95, 0.999), weight_decay=1e-6, warmup_fraction=0.1, grad_clip=1.0, random_flip=True)


def _images(n: int = 20) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resumed_training_equals_uninterrupted():
    """Resume from the epoch-2 state (after a save/load round trip): same weights and losses, bit for bit.

    Flips and dropout are on, so every random stream (order, flips, noise, timesteps, dropout) is exercised."""
    sched, x = make_scheduler(), _images()
    states: list[TrainState] = []
    full = build_unet(0, **TINY_MODEL)
    losses = train_ddpm(full, sched, x, RECIPE, seed=5, checkpoint_every=2, on_checkpoint=states.append)
    assert [s.epoch for s in states] == [2, 4] and states[0].step == 2 * 3
    buf = io.BytesIO()
    torch.save(states[0].to_dict(), buf)
    state = TrainState.from_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    resumed = build_unet(99, **TINY_MODEL)  # a different init: everything must come from the state
    resumed_losses = train_ddpm(resumed, sched, x, RECIPE, seed=5, resume=state)
    assert resumed_losses == losses
    for k, v in _weights(full).items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="seed"):
        train_ddpm(build_unet(0, **TINY_MODEL), sched, x, RECIPE, seed=6, resume=state)


def test_base_model_keeps_evenly_spaced_loadable_checkpoints(tmp_path):
    raw = tiny_config_dict("ckpt") | off_sections()
    raw["train"] = {**raw["train"], "epochs": 4, "checkpoint_every": 1}
    cfg = parse_config(raw)
    run = Store(str(tmp_path)).run("ckpt")
    x = _images()
    record = train_model(run, cfg, run.base_model(0), x, cfg.seed, "d1", keep_all=True)
    assert record["status"] == "trained" and record["resumed_from_epoch"] == 0
    ckpts = run.base_checkpoints()
    assert [e for e, _ in ckpts] == [1, 2, 3, 4]
    final, _ = load_model(run, run.base_model(0))
    last, _ = load_model(run, ckpts[-1][1])  # a plain diffusers directory
    for k, v in final.state_dict().items():
        torch.testing.assert_close(last.state_dict()[k], v, rtol=0, atol=0)
    first, _ = load_model(run, ckpts[0][1])
    assert any(not torch.equal(first.state_dict()[k], v) for k, v in final.state_dict().items())
    # A subset-style model keeps no checkpoint once finished, and a finished model is skipped.
    assert train_model(run, cfg, run.subset_model(0, 0), x[:10], 1, "d1")["status"] == "trained"
    assert run.checkpoints(run.subset_model(0, 0)) == []
    assert train_model(run, cfg, run.subset_model(0, 0), x[:10], 1, "d1")["status"] == "skipped"


def _config(name: str):
    raw = tiny_config_dict(name) | off_sections()
    # One worker: the one training task in flight is the model with a checkpoint and no completion marker.
    raw["train"] = {**raw["train"], "epochs": 12, "batch_size": 8, "checkpoint_every": 2}
    raw["resources"] = {"num_workers": 1}
    return parse_config(raw)


def _task_processes() -> list:
    """Ray task workers of this test's own Ray instance (its raylet is a child of this process): other
    Ray instances on the machine are left alone."""
    import os

    import psutil

    out = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::_run_task"):
                out.append(proc)
        except psutil.Error:
            continue
    return out


STAGES = ["data", "train", "generate", "outputs"]


@pytest.mark.slow
def test_killed_trainer_resumes_from_its_checkpoint(ray_local, tmp_path):
    cfg = _config("resume")
    reference = run_pipeline(cfg, str(tmp_path / "reference"), stages=STAGES, console=Console(file=io.StringIO()))
    store = str(tmp_path / "killed")
    run = Store(store).run(cfg.name)
    digest = stage_digests(cfg)["train"]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            run_pipeline(cfg, store, stages=STAGES, console=Console(file=io.StringIO()))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    killed_at: tuple[str, int] | None = None
    deadline = time.time() + 300
    while time.time() < deadline and killed_at is None and thread.is_alive():
        for m in range(cfg.lds.num_subsets):
            key = run.subset_model(m, 0)
            ckpts = run.checkpoints(key, digest)
            # Mid-training: a checkpoint exists, the model is not finished, and many epochs are left.
            if ckpts and 2 <= ckpts[-1][0] <= 6 and not run.done(key, digest):
                procs = _task_processes()
                if len(procs) == 1:
                    procs[0].kill()
                    killed_at = (key, ckpts[-1][0])
                break
        time.sleep(0.02)
    thread.join(timeout=600)
    assert killed_at is not None, "no training task was seen mid-training"
    assert not errors, errors
    key, epoch = killed_at
    record = run.marker(key)
    # The retried task started from the checkpoint, not from zero (it may have written one more before dying).
    assert record["resumed_from_epoch"] >= epoch > 0, (record, killed_at)
    killed_model, _ = load_model(run, key)
    ref_model, _ = load_model(reference, key)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(killed_model.state_dict()[k], v, rtol=1e-6, atol=1e-7, msg=k)
    for test_set in ("val", "gen"):
        np.testing.assert_allclose(run.read_array(run.outputs(test_set)), reference.read_array(reference.outputs(test_set)), rtol=1e-6, atol=1e-7)
    assert all(run.checkpoints(run.subset_model(m, 0)) == [] for m in range(cfg.lds.num_subsets))
