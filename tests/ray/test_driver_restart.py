"""Stop the driver in the middle of featurization, run again: only the missing shards are computed."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console

from dtrak_ray.config import parse_config
from dtrak_ray.core.diffusion import timestep_grid
from dtrak_ray.core.features import project_rows
from dtrak_ray.core.gradients import GradientComputer
from dtrak_ray.core.projectors import make_projector
from dtrak_ray.stages.common import load_images, load_model, scheduler_of
from dtrak_ray.storage import Store
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "dtrak_ray.cli"]


def _cli(args: list[str], **kw) -> subprocess.Popen:
    # A new session: killing its process group takes the driver and the local Ray it started,
    # as when the machine running the driver goes away.
    return subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def test_driver_killed_then_rerun_computes_only_missing_shards(tmp_path: Path):
    raw = tiny_config_dict("restart")
    raw["features"].update(shard_size=4, micro_batch=4)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    prep = subprocess.run(
        [sys.executable, "-c", "from dtrak_ray.cli import app; app()", "train", str(config), "--store", str(store)],
        capture_output=True, text=True, timeout=300,
    )
    assert prep.returncode != 0 and "needs stage" in prep.stdout + prep.stderr  # stages refuse to run out of order
    # The stages before featurize, in this process (one local Ray instead of one per stage command).
    import ray

    from dtrak_ray.pipeline import run_pipeline

    try:
        run_pipeline(parse_config(raw), str(store), stages=["data", "train", "generate"], console=Console(file=io.StringIO()))
    finally:
        ray.shutdown()

    run = Store(str(store)).run("restart")
    shard_markers = run.path("_markers/features/**/shard-*.json")
    proc = _cli(["featurize", str(config), "--store", str(store)])
    deadline = time.time() + 240
    while time.time() < deadline and len(run.fs.glob(shard_markers)) < 3:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray's workers run in sessions of their own and may finish the shard in hand before they notice
    # that their raylet is gone; wait until the count of finished shards settles.
    done_before, settled = -1, time.time() + 30
    while time.time() < settled:
        now = len(run.fs.glob(shard_markers))
        if now == done_before:
            break
        done_before = now
        time.sleep(3)
    total = 2 * (10 + 2 + 2)  # 2 output functions x (40 train + 8 val + 8 gen rows in shards of 4)
    assert 3 <= done_before < total

    wide = {**os.environ, "COLUMNS": "200"}  # one line per message
    rerun = subprocess.run(CLI + ["featurize", str(config), "--store", str(store)], capture_output=True, text=True, timeout=300, env=wide)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{done_before} of {total} shards already featurized: reused" in rerun.stdout, rerun.stdout
    rows_left = 2 * (40 + 8 + 8) - 4 * done_before
    assert f"{rows_left}/{rows_left} " in rerun.stdout, rerun.stdout  # the progress bar counts only the missing rows

    # The stored features equal a direct, single-process computation of every row.
    cfg = parse_config(raw)
    model, _ = load_model(run, run.base_model(0))
    torch.set_num_threads(1)
    gc = GradientComputer(model, scheduler_of(cfg))
    proj = make_projector("gaussian", gc.dim, 64, 0)
    grids = {K: timestep_grid(K) for K in (2, 4)}
    for split in ("train", "val", "gen"):
        x = load_images(run, split)
        for f in ("l_simple", "l_square"):
            ref = project_rows(gc, proj, x, list(range(x.shape[0])), f, grids, 0, "per-sample", micro_batch=4)
            for K in grids:
                stored = run.read_array(run.features("base", split, f, K, "gaussian", 64))
                np.testing.assert_array_equal(stored, ref[K].numpy(), err_msg=f"{split} {f} K={K}")
