"""Scoring at scale through a real local Ray instance: tree-reduced Gram matrices and blocked scores
written to a real store, checked against a direct dense computation, in the k x k and N x N forms;
then the baselines and ensemble stages of the pipeline on a tiny config."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from dtrak_ray.config import parse_config
from dtrak_ray.core.baselines import dot_scores, tracin_scores
from dtrak_ray.core.kernel import scores_direct
from dtrak_ray.distributed.cluster import Resources
from dtrak_ray.distributed.reduce import tree_sum
from dtrak_ray.pipeline import run_pipeline
from dtrak_ray.stages.common import Context
from dtrak_ray.stages.featurize import features_key
from dtrak_ray.stages.score import ScoreSpec, compute_scores, evaluate_one, kernel_for, kernel_spec
from dtrak_ray.storage import Store
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow

K = 3
LAMBDAS = [0.1, 5.0, 300.0]


def _leaf(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal((5, 5))


def test_tree_sum_equals_serial_sum(ray_local) -> None:
    res = Resources(workers=2, cpus=1, gpus=0, torch_threads=1)
    for n_items, fan_in in ((1, 2), (7, 3), (10, 2)):
        got = tree_sum(_leaf, list(range(n_items)), res, "test reduce", fan_in=fan_in)
        np.testing.assert_allclose(got, sum(_leaf(i) for i in range(n_items)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="no items"):
        tree_sum(_leaf, [], res, "empty")


@pytest.fixture(scope="module")
def synthetic(ray_local, tmp_path_factory):
    """A store holding random train/val features of two models: N = 80 >= k = 64 and N = 40 < k."""
    d = tiny_config_dict("scale")
    d["scoring"] = {"lambdas": LAMBDAS, "test_block": 4, "top_k": 5}
    cfg = parse_config(d)
    run = Store(str(tmp_path_factory.mktemp("store"))).run(cfg.name)
    ctx = Context(cfg=cfg, run=run, resources=Resources(workers=2, cpus=1, gpus=0, torch_threads=1), console=Console(file=io.StringIO()))
    rng = np.random.default_rng(0)
    feats = {}
    for model, n in (("big", 80), ("small", 40)):
        for split, rows in (("train", n), ("val", 10)):
            phi = rng.standard_normal((rows, 64)).astype(np.float32)
            key = features_key(run, cfg, split, "l_square", K, 64, model)
            arr = run.create_array(key, phi.shape, (16, 64), "float32", {"digest": f"d-{model}", "model_digest": model, "K": K, "k": 64})
            arr[...] = phi
            feats[(model, split)] = phi.astype(np.float64)
    return ctx, feats


@pytest.mark.parametrize(("model", "form"), [("big", "kxk"), ("small", "NxN")])
def test_blocked_tree_reduced_scores_equal_direct(synthetic, model: str, form: str) -> None:
    ctx, feats = synthetic
    run = ctx.run
    kkey, kernel = kernel_for(ctx, model, "l_square", K)
    assert kernel.form == form
    phi, test = feats[(model, "train")], feats[(model, "val")]
    specs = [
        kernel_spec(ctx, model, model, "val", "l_square", K, run.method_scores(model, "val", scale), kkey, kernel, scale=scale)
        for scale in ("none", "relative", "renormalized")
    ]
    compute_scores(ctx, specs, {kkey: kernel}, "test score")
    arr = run.open_array(specs[0].out_key)
    assert arr.shape == (3, 10, phi.shape[0]) and arr.chunks == (1, 4, 16) and arr.attrs["kernel_form"] == form
    got = {s.scale: run.read_array(s.out_key) for s in specs}
    for i, lam in enumerate(LAMBDAS):
        h_inv = np.linalg.inv(phi.T @ phi + lam * np.eye(64))
        direct = scores_direct(phi, test, lam)
        np.testing.assert_allclose(got["none"][i], direct, rtol=2e-5, atol=1e-6)
        self_inf = np.einsum("nk,kj,nj->n", phi, h_inv, phi)
        np.testing.assert_allclose(got["relative"][i], direct / np.sqrt(self_inf), rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(got["renormalized"][i], direct / np.linalg.norm(phi, axis=1), rtol=2e-5, atol=1e-6)
    # Top-5 train indices per test sample and lambda, beside the scores.
    top = run.read_array(f"{run.top_of(specs[0].out_key)}/indices")
    assert top.shape == (3, 10, 5)
    np.testing.assert_array_equal(top, np.argsort(-got["none"].astype(np.float64), axis=-1, kind="stable")[..., :5])
    # The stored factorization is reused by a second call (same features digest).
    assert run.done(kkey) and kernel_for(ctx, model, "l_square", K)[1].form == form


def test_dot_scores_with_checkpoint_weights_equal_direct(synthetic) -> None:
    ctx, feats = synthetic
    run = ctx.run
    key = lambda model, split: features_key(run, ctx.cfg, split, "l_square", K, 64, model)  # noqa: E731
    out = run.method_scores("x", "val", "tracin")
    spec = ScoreSpec(out, (key("big", "train"), key("big", "train")), (key("big", "val"), key("big", "val")), "dot", weights=(0.3, 0.7), cosine=True)
    compute_scores(ctx, [spec], {}, "test dot")
    got = run.read_array(out)
    assert got.shape == (1, 10, 80)
    t, p = feats[("big", "val")], feats[("big", "train")]
    np.testing.assert_allclose(got[0], tracin_scores([t, t], [p, p], [0.3, 0.7], cosine=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0], dot_scores(t, p, cosine=True), rtol=1e-5, atol=1e-6)


def test_evaluate_streams_lambdas_from_the_store(synthetic) -> None:
    ctx, _ = synthetic
    run = ctx.run
    arr = run.open_array(run.method_scores("big", "val", "none"))
    rng = np.random.default_rng(1)
    masks = rng.random((8, 80)) < 0.5
    outputs = rng.standard_normal((8, 10))
    folds = np.arange(10) % 2
    from_store = evaluate_one(arr, masks, outputs, LAMBDAS, folds, 8, 0)
    in_memory = evaluate_one(arr[...], masks, outputs, LAMBDAS, folds, 8, 0)
    for a, b in zip(from_store, in_memory, strict=True):
        assert a["lambda"] == b["lambda"] and a["lds_mean"] == pytest.approx(b["lds_mean"], abs=1e-12)


def test_pipeline_with_baselines_and_ensemble(ray_local, tmp_path) -> None:
    d = tiny_config_dict("with-baselines")
    # Kept small (the other end-to-end tests cover the rest): one K, 4 subsets, checkpoints at epochs 1 and 2 for TracIn/GAS.
    d["train"].update(epochs=2, checkpoint_every=1)
    d["features"]["K"] = [2]
    d["lds"]["num_subsets"] = 4
    d["baselines"] = {"methods": ["all"], "K": 2, "folds": 2}
    d["ensemble"] = {"sizes": [1, 2], "K": 2}
    cfg = parse_config(d)
    run = run_pipeline(cfg, str(tmp_path), console=Console(file=io.StringIO()))
    doc = run.read_json(run.LDS)
    methods = {(r["method"], r["test_set"]) for r in doc["records"]}
    expected = ["TRAK", "D-TRAK", "Raw pixels (dot)", "Raw pixels (cosine)", "Gradient (dot)", "Gradient (cosine)", "TracIn", "GAS",
                "Relative IF", "Renormalized IF", "Empirical influence", "Datamodels", "D-TRAK ensemble S=1", "D-TRAK ensemble S=2"]
    for method in expected:
        assert (method, "val") in methods and (method, "gen") in methods, method
    assert ("Journey-TRAK", "gen") in methods and ("Journey-TRAK", "val") not in methods
    assert [s["method"] for s in doc["skipped"]] == ["CLIP similarity"]
    report = run.read_text(run.REPORT)
    for method in expected + ["Journey-TRAK"]:
        assert f"| {method} |" in report
    assert "Not run: CLIP similarity" in report
    # An ensemble of one member is that member's own scores; S = 2 is the mean of two members.
    m0 = run.read_array(run.method_scores("ensemble-00", "val", "l_square-K2"))
    m1 = run.read_array(run.method_scores("ensemble-01", "val", "l_square-K2"))
    np.testing.assert_allclose(run.read_array(run.method_scores("ensemble-S1", "val", "l_square-K2")), m0, rtol=1e-6)
    np.testing.assert_allclose(run.read_array(run.method_scores("ensemble-S2", "val", "l_square-K2")), (m0 + m1) / 2, rtol=1e-5, atol=1e-7)
    # TracIn/GAS used the base model's stored checkpoints.
    tracin = run.open_array(run.method_scores("checkpoints", "val", "tracin-K2"))
    assert len(tracin.attrs["checkpoints"]) >= 2
