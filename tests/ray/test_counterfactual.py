"""Counterfactual stage, ground-truth reliability and the report sections, on a tiny config through local Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from rich.console import Console
from scipy.stats import spearmanr

from dtrak_ray.config import parse_config
from dtrak_ray.core.counterfactual import pixel_l2, random_removal, summarize, top_k_removal
from dtrak_ray.core.models import build_unet
from dtrak_ray.core.sampling import ddim_sample
from dtrak_ray.core.training import train_ddpm
from dtrak_ray.pipeline import run_pipeline
from dtrak_ray.stages.common import load_images, recipe_of, scheduler_of
from tests.conftest import TINY_MODEL, tiny_config_dict


def test_removal_and_distance_math():
    scores = np.array([0.1, 3.0, -2.0, 3.0, 0.5])
    np.testing.assert_array_equal(top_k_removal(scores, 3), [1, 3, 4])  # ties: lower index first
    r = random_removal(50, 10, seed=1, image=2)
    assert len(set(r.tolist())) == 10 and r.max() < 50
    np.testing.assert_array_equal(r, random_removal(50, 10, seed=1, image=2))
    assert not np.array_equal(r, random_removal(50, 10, seed=1, image=3))
    a, b = np.full((1, 2, 2), -1.0), np.full((1, 2, 2), 1.0)  # black vs white: 4 pixels differing by 1 on [0, 1]
    assert pixel_l2(a, b) == pytest.approx(2.0)
    rows = [{"method": "x", "l2": v} for v in (1.0, 2.0, 6.0)]
    (s,) = summarize(rows, ["x", "absent"])
    assert (s["l2_mean"], s["l2_median"], s["n_images"]) == (pytest.approx(3.0), 2.0, 3)
    with pytest.raises(ValueError, match="top-k"):
        top_k_removal(scores, 5)


def _config():
    raw = tiny_config_dict("cf")
    raw["lds"]["seeds"] = 2
    raw["counterfactual"] = {"n_images": 2, "top_k": 6, "methods": ["random", "l_simple", "l_square"]}
    return parse_config(raw | off_sections())


def off_sections() -> dict:
    """Other studies (baselines, ensembles) switched off where the config has them: this module tests the ground truth."""
    from dtrak_ray.config import ExperimentConfig

    fields = ExperimentConfig.model_fields
    return {k: v for k, v in (("baselines", {"methods": []}), ("ensemble", {"sizes": []})) if k in fields}


@pytest.fixture(scope="module")
def cf_run(ray_local, tmp_path_factory):
    cfg = _config()
    out = io.StringIO()
    run = run_pipeline(cfg, str(tmp_path_factory.mktemp("store")), console=Console(file=out, width=200))
    return cfg, run, out.getvalue()


@pytest.mark.slow
def test_counterfactual_rows_follow_the_scores(cf_run):
    cfg, run, log = cf_run
    doc = run.read_json(run.COUNTERFACTUAL)
    assert doc["top_k"] == 6 and doc["K"] == 4 and "CLIP" in doc["clip"] and "skipped" in doc["clip"]
    assert {(r["image"], r["method"]) for r in doc["rows"]} == {(i, m) for i in range(2) for m in ("random", "TRAK", "D-TRAK")}
    lds_recs = run.read_json(run.LDS)["records"]
    lambdas = run.open_array(run.scores("base", "gen", "l_square", 4, "gaussian", 64)).attrs["lambdas"]
    for row in doc["rows"]:
        assert len(set(row["removed"])) == 6 and np.isfinite(row["l2"]) and row["l2"] > 0
        if row["f"] == "random":
            continue
        # Independently: the top 6 of the stored score row at the lambda recorded for that image.
        lam = doc["lambda"][row["f"]][row["image"]]
        rec = next(r for r in lds_recs if r["f"] == row["f"] and r["K"] == 4 and r["test_set"] == "gen" and r["lambda_selection"] == "held-out")
        assert lam in rec["lambda_folds"]
        tau = run.read_array(run.scores("base", "gen", row["f"], 4, "gaussian", 64))[lambdas.index(lam), row["image"]]
        assert set(row["removed"]) == set(np.argsort(-tau)[:6].tolist())
    summary = run.read_json(run.SUMMARY)["counterfactual"]
    assert [m["method"] for m in summary["methods"]] == ["random", "TRAK", "D-TRAK"]


@pytest.mark.slow
def test_regeneration_matches_an_independent_retraining(cf_run):
    """Retrain D-TRAK's counterfactual model for image 1 in this process, regenerate, compare."""
    cfg, run, _ = cf_run
    doc = run.read_json(run.COUNTERFACTUAL)
    row = next(r for r in doc["rows"] if r["f"] == "l_square" and r["image"] == 1)
    train = load_images(run, "train")
    keep = torch.ones(train.shape[0], dtype=torch.bool)
    keep[row["removed"]] = False
    model = build_unet(cfg.seed, **TINY_MODEL)
    train_ddpm(model, scheduler_of(cfg), train[keep], recipe_of(cfg), cfg.seed)
    image = ddim_sample(model, scheduler_of(cfg), (1, 8, 8), [1], cfg.generate.seed, cfg.generate.ddim_steps, 0.0)[0].numpy()
    stored = run.read_array(run.COUNTERFACTUAL_IMAGES)[1, cfg.counterfactual.methods.index("l_square")]
    np.testing.assert_allclose(stored, image, atol=1e-5)
    original = load_images(run, "gen").numpy()[1]
    assert row["l2"] == pytest.approx(np.sqrt((((image - original) / 2) ** 2).sum()), rel=1e-4)


@pytest.mark.slow
def test_seed_reliability_and_report_sections(cf_run):
    cfg, run, _ = cf_run
    summary = run.read_json(run.SUMMARY)
    for test_set in ("val", "gen"):
        raw = run.read_array(run.outputs(test_set)).mean(axis=2)  # (M, 2 seeds, n)
        expected = np.nanmean([spearmanr(raw[:, 0, j], raw[:, 1, j]).statistic for j in range(raw.shape[2])])
        assert summary["seed_reliability"][test_set] == pytest.approx(expected, abs=1e-9)
    report = run.read_text(run.REPORT)
    for needle in ("## Counterfactual evaluation", "| D-TRAK | 2 |", "counterfactual.png", "per_sample_lds.png", "## Reliability of the ground truth"):
        assert needle in report, needle
    for fig in ("counterfactual.png", "per_sample_lds.png"):
        assert run.read_bytes(run.report_file(fig)).startswith(b"\x89PNG")
    # Finished subset and counterfactual models keep no checkpoints; the base model keeps its evenly spaced ones.
    assert run.checkpoints(run.subset_model(0, 1)) == []
    assert run.checkpoints(run.counterfactual_model("l_square", 0)) == []
    assert [e for e, _ in run.base_checkpoints()] == [1, 2]
