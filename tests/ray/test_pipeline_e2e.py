"""The whole pipeline on a tiny config through a real local Ray instance and a local store."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from rich.console import Console

from dtrak_ray.config import parse_config
from dtrak_ray.errors import MissingArtifactError, RunConflictError
from dtrak_ray.pipeline import STAGES, run_pipeline
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("store"))
    cfg = parse_config(tiny_config_dict())
    run = run_pipeline(cfg, store, console=Console(file=io.StringIO()))
    return cfg, store, run


def test_summary_has_every_method_set_and_k(finished_run):
    cfg, _, run = finished_run
    summary = run.read_json(run.SUMMARY)
    keys = {(r["method"], r["test_set"], r["K"], r["lambda_selection"]) for r in summary["lds"]}
    assert keys == {(m, s, K, sel) for m in ("TRAK", "D-TRAK") for s in ("val", "gen") for K in (2, 4) for sel in ("oracle", "held-out")}
    for r in summary["lds"]:
        assert {"method", "f", "test_set", "K", "k", "projector", "lambda", "lambda_selection", "lds_mean", "lds_std"} <= r.keys()
        assert r["k"] == 64 and r["projector"] == "gaussian" and r["lambda"] > 0
        assert -100 <= r["lds_mean"] <= 100 and math.isfinite(r["lds_std"])
    report = run.read_text(run.REPORT)
    assert "| TRAK | 2 |" in report and "top_attributions.png" in report
    assert run.read_bytes(run.report_file("top_attributions.png")).startswith(b"\x89PNG")


def test_arrays_carry_provenance(finished_run):
    cfg, _, run = finished_run
    feats = run.open_array(run.features("base", "train", "l_square", 4, "gaussian", 64))
    assert feats.shape == (40, 64) and feats.chunks == (16, 64)
    attrs = dict(feats.attrs)
    for field, value in {"output_function": "l_square", "K": 4, "timestep_strategy": "uniform", "noise": "per-sample",
                         "projector": "gaussian", "k": 64, "noise_seed": 0, "projector_seed": 0}.items():
        assert attrs[field] == value
    assert len(attrs["model_digest"]) == 16
    assert np.isfinite(feats[...]).all() and np.abs(feats[...]).sum() > 0
    outputs = run.open_array(run.outputs("val"))
    assert outputs.shape == (6, 1, 1, 8) and (outputs[...] > 0).all()
    masks = run.read_array(f"{run.INDICES}/masks")
    assert masks.shape == (6, 40) and (masks.sum(1) == 20).all()
    scores = run.open_array(run.scores("base", "gen", "l_simple", 2, "gaussian", 64))
    assert scores.shape == (27, 8, 40) and scores.attrs["kernel_form"] == "NxN"


def test_second_run_reuses_every_stage(finished_run):
    cfg, store, _ = finished_run
    out = io.StringIO()
    run_pipeline(cfg, store, console=Console(file=out, width=200))
    text = out.getvalue()
    for stage in STAGES:
        assert f"- {stage.name}: done earlier, reused" in text


def test_changed_config_on_same_run_is_refused(finished_run):
    cfg, store, run = finished_run
    changed = parse_config({**tiny_config_dict(), "features": {**tiny_config_dict()["features"], "k": 32}})
    with pytest.raises(RunConflictError, match="features.k"):
        run_pipeline(changed, store, console=Console(file=io.StringIO()))
    assert run.exists(run.SUMMARY)  # nothing already stored was touched


def test_single_stage_needs_its_inputs(ray_local, tmp_path):
    cfg = parse_config(tiny_config_dict("fresh"))
    with pytest.raises(MissingArtifactError, match="needs stage"):
        run_pipeline(cfg, str(tmp_path), stages=["featurize"], console=Console(file=io.StringIO()))


def test_lost_shard_is_redone_alone_and_identical(finished_run):
    """Remove one shard's marker and zero its rows: a rerun recomputes that shard alone, bit-identically."""
    cfg, store, run = finished_run
    feats_key = run.features("base", "val", "l_simple", 4, "gaussian", 64)
    before = run.read_array(feats_key)
    run.clear_marker("features/base/val/l_simple-gaussian-k64/shard-00000")
    run.clear_marker("stages/featurize")
    arr = run.open_array(feats_key, mode="r+")
    arr[0:8] = 0.0
    out = io.StringIO()
    run_pipeline(cfg, store, stages=["featurize"], console=Console(file=out, width=200))
    assert "9 of 10 shards already featurized" in out.getvalue()
    np.testing.assert_array_equal(run.read_array(feats_key), before)


def _actor_processes() -> list:
    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::_Actor"):
            procs.append(proc)
    return procs


def test_killed_featurizer_actor_is_replaced_and_features_are_identical(finished_run):
    """SIGKILL a featurizer actor mid-run: Ray restarts it, its shard is retried, features are bit-identical."""
    import threading
    import time

    cfg, store, run = finished_run
    keys = [run.features("base", s, f, K, "gaussian", 64) for s in ("train", "val", "gen") for f in ("l_simple", "l_square") for K in (2, 4)]
    before = {k: run.read_array(k) for k in keys}
    for marker in run.fs.glob(run.path("_markers/features/**/shard-*.json")):
        run.fs.rm(marker)
    run.clear_marker("stages/featurize")
    for k in keys:  # wipe the data too, so nothing stale can pass for a result
        arr = run.open_array(k, mode="r+")
        arr[...] = 0.0
    errors: list[BaseException] = []

    def work() -> None:
        try:
            run_pipeline(cfg, store, stages=["featurize"], console=Console(file=io.StringIO()))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    deadline = time.time() + 120
    killed = 0
    while time.time() < deadline and not killed:
        done = run.fs.glob(run.path("_markers/features/**/shard-*.json"))
        actors = _actor_processes()
        if done and actors:
            actors[0].kill()
            killed = 1
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed == 1, "no featurizer actor was seen running"
    assert not errors, errors
    for k in keys:
        np.testing.assert_array_equal(run.read_array(k), before[k], err_msg=k)
