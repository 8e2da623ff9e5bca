"""The Ray Tune sweep on a tiny run: `dtrak-ray run` then `dtrak-ray sweep` through a real local Ray.

Checked against independent computations: a trial's held-out LDS equals the one computed directly
(plain k x k solves per lambda, the recorded split, core LDS) on the same stored features; the
prefix claim (the first k' columns of the k-features are the k'-features) holds for features the
featurize code computes at both dimensions, and for the projectors themselves.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from dtrak_ray.cli import app
from dtrak_ray.config import load_config, parse_config
from dtrak_ray.core.kernel import scores_direct
from dtrak_ray.core.lds import lds, lds_per_sample
from dtrak_ray.core.projectors import make_projector
from dtrak_ray.storage import Store
from dtrak_ray.sweep import TrialInputs, compute_features, heldout_split, run_sweep, run_trial
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow

SWEEP = {"k": [16, 64], "K": [2, 4], "output_functions": ["l_square", "l_avg"], "selection_fraction": 0.5, "split_seed": 3}


def _config_file(tmp_path, name: str = "swept") -> str:
    raw = tiny_config_dict(name)
    raw["sweep"] = SWEEP
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _markers(run, pattern: str) -> dict[str, str]:
    return {p: run.fs.cat_file(p).decode() for p in run.fs.glob(run.path(f"_markers/{pattern}"))}


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    """A tiny run made by the CLI's stage commands (the stages the sweep reads; the later ones of `dtrak-ray run`
    would only cost time here), then `dtrak-ray sweep` on it (l_avg is not in the run: the sweep featurizes it)."""
    tmp = tmp_path_factory.mktemp("sweep")
    store, config = str(tmp / "store"), _config_file(tmp)
    runner = CliRunner()
    for stage in ("data", "train", "generate", "outputs", "featurize"):
        res = runner.invoke(app, [stage, config, "--store", store])
        assert res.exit_code == 0, res.output
    cfg = load_config(config)
    run = Store(store).run(cfg.name)
    run_markers = _markers(run, "features/**/*.json")
    res = runner.invoke(app, ["sweep", config, "--store", store], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return cfg, store, config, run, run_markers, res.output


def test_sweep_writes_json_table_plot_and_names_the_best(swept):
    cfg, _, _, run, _, output = swept
    doc = run.read_json(run.SWEEP)
    assert len(doc["trials"]) == 2 * 2 * 2
    assert {(t["f"], t["K"], t["k"]) for t in doc["trials"]} == {(f, K, k) for f in ("l_square", "l_avg") for K in (2, 4) for k in (16, 64)}
    objectives = [t["objective"] for t in doc["trials"]]
    assert objectives == sorted(objectives, reverse=True) and all(np.isfinite(objectives))
    for t in doc["trials"]:
        assert t["objective"] == t["val_lds"] and -100 <= t["val_lds"] <= 100 and t["val_lds_std"] >= 0
        assert t["val_lambda"] in doc["lambdas"] and t["gen_lambda"] in doc["lambdas"]
        assert len(t["val_curve_select"]) == len(doc["lambdas"]) == 27
        assert t["kernel_form"] == ("NxN" if t["k"] > 40 else "kxk")
    best = doc["trials"][0]
    assert doc["best"]["f"] == best["f"] and doc["best"]["k"] == best["k"]
    md = run.read_text(run.report_file("sweep.md"))
    assert f"**Best configuration: {best['method']} (f = {best['f']}), K = {best['K']}, k = {best['k']}" in md
    assert md.count("\n| ") == 1 + 8 and "![sweep](sweep.png)" in md
    assert run.read_bytes(run.report_file("sweep.png")).startswith(b"\x89PNG")
    assert "best:" in output and "Sweep:" in output
    # Tune kept its experiment under the run's store.
    assert run.fs.glob(run.path(f"{run.SWEEP_TUNE}/sweep-{cfg.name}/*"))


def test_trial_lds_equals_direct_computation_on_the_same_features(swept):
    """The sweep's record for (l_square, K=4, k=16) against plain solves on the stored k=64 features' first 16 columns."""
    cfg, _, _, run, _, _ = swept
    doc = run.read_json(run.SWEEP)
    rec = next(t for t in doc["trials"] if (t["f"], t["K"], t["k"]) == ("l_square", 4, 16))
    assert rec["k_source"] == 64  # reused from the run, not recomputed
    masks = run.read_array(f"{run.INDICES}/masks").astype(bool)
    phi = {s: run.read_array(run.features("base", s, "l_square", 4, "gaussian", 64))[:, :16].astype(np.float64) for s in ("train", "val", "gen")}
    for s in ("val", "gen"):
        y = run.read_array(run.outputs(s)).mean(axis=(1, 2))
        sel, held = np.array(doc["split"][s]["select"]), np.array(doc["split"][s]["heldout"])
        assert len(sel) == 4 and len(held) == 4 and not set(sel) & set(held)
        tau = [scores_direct(phi["train"], phi[s], lam) for lam in doc["lambdas"]]
        select_curve = [np.nanmean(lds_per_sample(t[sel], masks, y[:, sel])) for t in tau]
        chosen = int(np.nanargmax(select_curve))
        assert rec[f"{s}_lambda"] == doc["lambdas"][chosen]
        assert rec[f"{s}_lds_select"] == pytest.approx(100 * select_curve[chosen], abs=1e-6)
        direct = lds(tau[chosen][held], masks, y[:, held], n_resamples=cfg.lds.bootstrap_resamples, seed=cfg.seed)
        assert rec[f"{s}_lds"] == pytest.approx(100 * direct.boot_mean, abs=1e-6)
        assert rec[f"{s}_lds_std"] == pytest.approx(100 * direct.boot_std, abs=1e-6)
        # The point estimate once more with scipy's own Spearman, column by column.
        pred = -(masks[:, None, :] * tau[chosen][held][None]).sum(-1)
        rho = [scipy.stats.spearmanr(pred[:, i], y[:, held][:, i]).statistic for i in range(len(held))]
        assert rec[f"{s}_lds_point"] == pytest.approx(100 * np.nanmean(rho), abs=1e-6)


def test_lambda_chosen_on_held_out_subsets_matches_direct_computation(swept):
    """lambda_selection=subsets: lambda picked on some LDS subsets, LDS measured on the others."""
    cfg, _, _, run, _, _ = swept
    cfg = parse_config({**cfg.model_dump(mode="json"), "sweep": {**SWEEP, "lambda_selection": "subsets"}})
    doc = run.read_json(run.SWEEP)
    masks = run.read_array(f"{run.INDICES}/masks").astype(bool)
    outputs = {s: run.read_array(run.outputs(s)).mean(axis=(1, 2)) for s in ("val", "gen")}
    splits = {s: heldout_split("subsets", 8, masks.shape[0], 0.5, 3) for s in ("val", "gen")}
    lambdas = tuple(doc["lambdas"])
    rec = run_trial({"f": "l_avg", "K": 2, "k": 16}, TrialInputs(run, cfg, masks, outputs, lambdas, splits, doc["feature_sources"]))
    phi = {s: run.read_array(run.features("base", s, "l_avg", 2, "gaussian", 64))[:, :16].astype(np.float64) for s in ("train", "val")}
    sel, held = splits["val"].select, splits["val"].heldout
    assert len(sel) == 3 and len(held) == 3
    tau = [scores_direct(phi["train"], phi["val"], lam) for lam in lambdas]
    curve = [np.nanmean(lds_per_sample(t, masks[sel], outputs["val"][sel])) for t in tau]
    chosen = int(np.nanargmax(curve))
    assert rec["val_lambda"] == lambdas[chosen]
    direct = lds(tau[chosen], masks[held], outputs["val"][held], n_resamples=cfg.lds.bootstrap_resamples, seed=cfg.seed)
    assert rec["val_lds"] == pytest.approx(100 * direct.boot_mean, abs=1e-6)


def test_sweep_featurized_what_the_run_lacked_without_touching_the_runs_markers(swept):
    cfg, _, _, run, run_markers, _ = swept
    doc = run.read_json(run.SWEEP)
    assert doc["feature_sources"] == {"l_square/2": 64, "l_square/4": 64, "l_avg/2": 64, "l_avg/4": 64}
    for s, n in (("train", 40), ("val", 8), ("gen", 8)):
        arr = run.open_array(run.features("base", s, "l_avg", 4, "gaussian", 64))
        assert arr.shape == (n, 64) and arr.attrs["made_by"] == "sweep" and arr.attrs["output_function"] == "l_avg"
        assert np.isfinite(arr[...]).all() and np.abs(arr[...]).min(axis=1).max() > 0  # every row written
    assert {p: v for p, v in _markers(run, "features/**/*.json").items() if p in run_markers} == run_markers


def test_largest_k_serves_smaller_k_by_prefix(swept, ray_local):
    """Features computed by the featurize code at k=16 are, bit for bit, the first 16 columns of the run's at k=64.

    Both passes take the same K set ([2, 4]): the gradients of nested grids come from one backward, so a
    different K set would change float32 rounding (~1e-6), which is not what this test is about."""
    from dtrak_ray.pipeline import resources_of, stage_digests

    cfg, _, _, run, _, _ = swept
    compute_features(run, cfg, stage_digests(cfg), 16, {"l_square": [2, 4]}, resources_of(cfg))
    for s in ("train", "val", "gen"):
        for K in (2, 4):
            small = run.read_array(run.features("base", s, "l_square", K, "gaussian", 16))
            large = run.read_array(run.features("base", s, "l_square", K, "gaussian", 64))
            np.testing.assert_array_equal(small, large[:, :16])


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_projector_prefix_property(kind):
    g = torch.randn(5, 9000, generator=torch.Generator().manual_seed(0))  # spans three row tiles
    big, small = make_projector(kind, 9000, 1100, 3), make_projector(kind, 9000, 300, 3)
    torch.testing.assert_close(big.project(g)[:, :300], small.project(g), rtol=0, atol=0)
    # SJLT has no such property: it is featurized at each k.
    assert not torch.equal(make_projector("sjlt", 9000, 1100, 3).project(g)[:, :300], make_projector("sjlt", 9000, 300, 3).project(g))


def test_second_sweep_reuses_every_feature_set(swept):
    cfg, store, _, run, _, _ = swept
    before = {(t["f"], t["K"], t["k"]): t["objective"] for t in run.read_json(run.SWEEP)["trials"]}
    out = io.StringIO()
    doc = run_sweep(cfg, store, console=Console(file=out, width=200))
    text = out.getvalue()
    assert text.count("reused (stored k=64") == 4 and "to compute" not in text
    assert {(t["f"], t["K"], t["k"]): t["objective"] for t in doc["trials"]} == before  # deterministic


def test_bad_input_is_refused_with_exit_code_2(swept, tmp_path):
    _, store, config, _, _, _ = swept

    def sweep(*args: str) -> tuple[int, str]:
        res = CliRunner().invoke(app, ["sweep", *args])
        return res.exit_code, " ".join(res.output.split())  # rich wraps long messages

    code, out = sweep(_config_file(tmp_path, "never-ran"), "--store", store)
    assert code == 2 and "not found" in out and "dtrak-ray run" in out
    code, out = sweep(config, "--store", store, "--set", "features.noise_seed=5")
    assert code == 2 and "features.noise_seed" in out and "different config" in out
    code, out = sweep(config, "--store", store, "--set", "sweep.selection_fraction=1.5")
    assert code == 2 and "sweep.selection_fraction" in out
    code, out = sweep(config, "--store", store, "--set", "sweep.selection_fraction=0.05")
    assert code == 2 and "splits 8 test samples into 0 + 8: each part needs at least 1" in out
    code, out = sweep(config, "--store", store, "--set", "sweep.output_functions=[l_cube]")
    assert code == 2 and "sweep.output_functions" in out


def test_job_entrypoint_refuses_bad_input(swept, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("sweep_job", Path(__file__).resolve().parents[2] / "jobs" / "sweep.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    _, store, config, _, _, _ = swept
    assert job.main(["--config", config, "--store", store, "--set", "sweep.k=[0]", "--address", "local"]) == 2
    assert "sweep.k" in capsys.readouterr().err


def test_demo_config_has_a_sweep():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "jobs" / "configs" / "demo.yaml")
    assert cfg.sweep.k == (256, 512, 2048) and cfg.sweep.K == (10, 100) and cfg.sweep.output_functions == ("l_simple", "l_square")
    assert max(cfg.sweep.k) <= cfg.features.k  # served by the run's own features, by prefix


def test_sweep_constants_mirror_the_stages():
    """dtrak_ray.sweep keeps torch out of Tune trials by mirroring two constants and a key of the stages: they must agree."""
    from dtrak_ray import sweep
    from dtrak_ray.stages import common, featurize

    cfg = parse_config(tiny_config_dict())
    run = Store("memory://sweep-constants").run("x")
    assert sweep.TEST_SETS == common.TEST_SETS and sweep.MODEL == featurize.MODEL
    assert sweep.features_key(run, cfg, "val", "l_avg", 4, 16) == featurize.features_key(run, cfg, "val", "l_avg", 4, 16)
    # ... and importing the sweep, as every trial does, loads neither torch nor diffusers.
    probe = "import sys, dtrak_ray.sweep; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
