"""Stages ``score`` (attribution scores for every lambda) and ``evaluate`` (LDS, lambda selection).

``score``: for each output function and K, the Gram matrix of the train features is summed from
per-shard partial products by a tree of Ray tasks that read the shards from the store
(:func:`dtrak_ray.distributed.reduce.tree_sum`): Phi^T Phi (k x k) from row shards, or Phi Phi^T
(N x N) from column blocks when N < k; the choice is automatic and recorded (``kernel_form``). One
eigendecomposition, stored under ``kernel/``, serves all lambdas of the grid. Scores (L, n_test, N)
are computed by Ray tasks, one block of test rows each, streaming the train shards; each task
writes its own chunks of ``scores/base/{set}/...zarr`` and the top-k train indices per test sample
and lambda beside them (``...-top.zarr/{indices,values}``). No task holds more than a test block,
a train shard and the factorization, whatever N.

The same engine (:class:`ScoreSpec`, :func:`compute_scores`) scores the baselines and the ensemble
members. Every stage that writes scores lists them in ``scores/index/{stage}.json``.

``evaluate``: LDS of every listed scores array (and of the cross-fitted predictions of the
baselines fitted on the LDS subsets) under two labelled lambda protocols:
- ``oracle`` (the paper's): the lambda with the best mean LDS on the evaluation samples themselves;
- ``held-out`` (fair): the test samples are split in two folds; each fold is scored with the
  lambda that is best on the other fold (cross-fitting), so no sample chooses its own lambda.
A method without lambda gets the same number under both labels (its ``lambda`` is null).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np

from dtrak_ray.core.baselines import dot_scores, relative_scale, renormalized_scale
from dtrak_ray.core.kernel import (
    KernelEig,
    choose_form,
    factorize,
    gram_partial,
    lambda_grid,
    left_factor,
    merge_topk,
    right_factor,
    scores_block,
    self_influence,
)
from dtrak_ray.core.lds import lds, lds_per_sample
from dtrak_ray.core.outputs import METHOD_NAMES
from dtrak_ray.distributed.pool import map_tasks
from dtrak_ray.distributed.reduce import tree_sum
from dtrak_ray.provenance import check_features_pair, check_scores_vs_ground_truth
from dtrak_ray.stages.common import TEST_SETS, Context, provenance
from dtrak_ray.stages.data import read_masks
from dtrak_ray.stages.featurize import MODEL, feature_dim, features_key, stored_dim
from dtrak_ray.stages.groundtruth import read_outputs
from dtrak_ray.storage import RunStore

# Columns of Phi per leaf of the N x N reduction: (N, 512) float64 blocks.
_COLUMN_BLOCK = 512
# Stages whose score indexes the evaluate stage reads, in table order.
SCORING_STAGES = ("score", "baselines", "ensemble")


def lambdas_of(ctx: Context) -> list[float]:
    return list(ctx.cfg.scoring.lambdas or lambda_grid())


def scores_key(ctx: Context, test_set: str, f: str, K: int) -> str:
    fc = ctx.cfg.features
    return ctx.run.scores(MODEL, test_set, f, K, fc.projector, fc.k if fc.projector != "none" else 0)


# ---- reduction: the factorized Gram matrix of a features array -----------------------------------
def _gram_leaf(block: tuple[int, int], run: RunStore, key: str, form: str) -> np.ndarray:
    """One shard's partial Gram product, read from the store inside the Ray task."""
    arr = run.open_array(key)
    start, stop = block
    rows = arr[start:stop] if form == "kxk" else arr[:, start:stop]
    return gram_partial(np.asarray(rows), form)  # type: ignore[arg-type]


def reduce_gram(ctx: Context, train_key: str, desc: str) -> KernelEig:
    """Factorized Gram matrix of the (N, k) features at ``train_key``, tree-reduced from shards by Ray tasks.

    k x k from row shards (the Zarr chunks) when N >= k; N x N from column blocks when N < k.
    """
    arr = ctx.run.open_array(train_key)
    n, k = arr.shape
    form = choose_form(n, k)
    step = arr.chunks[0] if form == "kxk" else _COLUMN_BLOCK
    size = n if form == "kxk" else k
    blocks = [(s, min(s + step, size)) for s in range(0, size, step)]
    g = tree_sum(partial(_gram_leaf, run=ctx.run, key=train_key, form=form), blocks, ctx.resources, desc)
    return factorize(g, form)


def kernel_for(ctx: Context, model: str, f: str, K: int) -> tuple[str, KernelEig]:
    """The stored factorization of a model's train features (computed and stored if missing or stale)."""
    cfg, run = ctx.cfg, ctx.run
    k = stored_dim(cfg)
    train_key = features_key(run, cfg, "train", f, K, k, model)
    key = run.kernel(model, f, K, cfg.features.projector, k)
    src = dict(run.open_array(train_key).attrs)
    ident = {"features_digest": src.get("digest"), "model_digest": src.get("model_digest")}
    if run.exists(f"{key}/eigvecs") and run.done(key, digest=str(ident)):
        vals = run.open_array(f"{key}/eigvals")
        return key, KernelEig(form=vals.attrs["kernel_form"], eigvals=np.asarray(vals[...]), eigvecs=run.read_array(f"{key}/eigvecs"))
    kernel = reduce_gram(ctx, train_key, f"reduce {model} {f} K={K}")
    attrs = provenance(cfg, kernel_form=kernel.form, train_features=train_key, **ident)
    run.write_group(key, {"eigvals": kernel.eigvals, "eigvecs": kernel.eigvecs}, attrs)
    run.mark_done(key, digest=str(ident))
    return key, kernel


# ---- blocked scoring ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ScoreSpec:
    """One scores array (L, m, N) to compute.

    kind "kernel": D-TRAK-form scores Phi_test (Phi^T Phi + lam I)^-1 Phi^T for every lambda with the
    factorization ``kernel`` of ``train[0]``; ``scale`` "relative" / "renormalized" turns them into
    relative / renormalized influence. kind "dot": one (L = 1) matrix sum_c weights[c] <test_c, train_c>
    (cosine similarities with ``cosine``), over pairs of stored arrays, flattened per row (pixels work too).
    """

    out_key: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    kind: Literal["kernel", "dot"]
    kernel: str | None = None
    lambdas: tuple[float, ...] = (1.0,)
    scale: Literal["none", "relative", "renormalized"] = "none"
    weights: tuple[float, ...] = (1.0,)
    cosine: bool = False
    attrs: dict[str, Any] = field(default_factory=dict)


def _rows(arr: Any, start: int, stop: int) -> np.ndarray:
    block = np.asarray(arr[start:stop])
    return block.reshape(block.shape[0], -1).astype(np.float64)


def _score_item(item: tuple[int, int, int], specs: list[ScoreSpec], kernels: dict[str, KernelEig], run: RunStore, top: int) -> int:
    """Scores of test rows [a, b) of one spec against every train shard, written to the store."""
    i, a, b = item
    spec = specs[i]
    trains = [run.open_array(k) for k in spec.train]
    tests = [_rows(run.open_array(k), a, b) for k in spec.test]
    n = trains[0].shape[0]
    step = trains[0].chunks[0]
    shards = [(s, min(s + step, n)) for s in range(0, n, step)]
    if spec.kind == "kernel":
        kernel = kernels[spec.kernel or ""]
        cross = None
        if kernel.form == "NxN":  # Phi_test Phi^T, assembled shard by shard (N < k here, so (b, N) is small)
            cross = np.concatenate([tests[0] @ _rows(trains[0], s, e).T for s, e in shards], axis=1)
        left = left_factor(kernel, tests[0], cross)
    out = run.open_array(spec.out_key, mode="r+")
    vals = idx = None
    for s, e in shards:
        if spec.kind == "kernel":
            need_rows = kernel.form == "kxk" or spec.scale == "renormalized"
            rows = _rows(trains[0], s, e) if need_rows else None
            right = right_factor(kernel, rows, slice(s, e))
            tau = scores_block(kernel, left, right, spec.lambdas)
            if spec.scale == "relative":
                tau *= relative_scale(self_influence(kernel, right, spec.lambdas))[:, None, :]
            elif spec.scale == "renormalized":
                tau *= renormalized_scale(rows)[None, None, :]
        else:
            tau = sum(w * dot_scores(t, _rows(tr, s, e), spec.cosine) for t, tr, w in zip(tests, trains, spec.weights, strict=True))[None]
        out[:, a:b, s:e] = tau.astype(out.dtype)
        vals, idx = merge_topk(vals, idx, tau, np.arange(s, e), min(top, n))
    run.open_array(f"{run.top_of(spec.out_key)}/indices", mode="r+")[:, a:b] = idx
    run.open_array(f"{run.top_of(spec.out_key)}/values", mode="r+")[:, a:b] = vals.astype(np.float32)
    return b - a


def compute_scores(ctx: Context, specs: list[ScoreSpec], kernels: dict[str, KernelEig], desc: str) -> None:
    """Create every spec's arrays, then score blocks of test rows as Ray tasks writing their own chunks."""
    run, sc = ctx.run, ctx.cfg.scoring
    items = []
    for i, spec in enumerate(specs):
        train, test = run.open_array(spec.train[0]), run.open_array(spec.test[0])
        n, m, n_lam = train.shape[0], test.shape[0], len(spec.lambdas) if spec.kind == "kernel" else 1
        block = min(sc.test_block, m)
        top = min(sc.top_k, n)
        attrs = {**spec.attrs, "lambdas": list(spec.lambdas) if spec.kind == "kernel" else None, "train_features": list(spec.train),
                 "test_features": list(spec.test), "scale": spec.scale, "cosine": spec.cosine, "weights": list(spec.weights)}
        run.create_array(spec.out_key, (n_lam, m, n), (1, block, train.chunks[0]), "float32", attrs)
        run.create_array(f"{run.top_of(spec.out_key)}/indices", (n_lam, m, top), (n_lam, block, top), "int64", attrs)
        run.create_array(f"{run.top_of(spec.out_key)}/values", (n_lam, m, top), (n_lam, block, top), "float32", attrs)
        items += [(i, a, min(a + block, m)) for a in range(0, m, block)]
    fn = partial(_score_item, specs=specs, kernels=kernels, run=run, top=sc.top_k)
    map_tasks(fn, items, ctx.resources, desc, weight=lambda it: it[2] - it[1], unit="test rows")


def write_index(ctx: Context, stage: str, entries: list[dict], digest: str, skipped: list[dict] | None = None) -> None:
    """List the scores arrays (or predictions) a stage wrote, for the evaluate stage; ``skipped``: methods
    not run, each with the reason (the report prints them)."""
    ctx.run.write_json(ctx.run.score_index(stage), {"digest": digest, "entries": entries, "skipped": skipped or []})


def kernel_spec(ctx: Context, model: str, test_model: str, test_split: str, f: str, K: int, out_key: str, kernel_key: str, kernel: KernelEig,
                scale: Literal["none", "relative", "renormalized"] = "none", test_f: str | None = None, **attrs: Any) -> ScoreSpec:
    """A kernel-form spec: train features of ``model`` (f, K) against test features of ``test_model``."""
    cfg, run = ctx.cfg, ctx.run
    k = stored_dim(cfg)
    train_key = features_key(run, cfg, "train", f, K, k, model)
    test_key = features_key(run, cfg, test_split, test_f or f, K, k, test_model)
    src = dict(run.open_array(train_key).attrs)
    # Refuse test features made differently from the train features (names every differing field).
    check_features_pair(train_key, src, test_key, dict(run.open_array(test_key).attrs), same_featurizer=test_model == model and test_f is None)
    meta = provenance(
        cfg, test_set=test_split, kernel_form=kernel.form, kernel=kernel_key,
        **{key: src.get(key) for key in ("output_function", "K", "noise", "noise_seed", "projector", "projector_seed", "k", "model_digest")}, **attrs,
    )
    return ScoreSpec(out_key, (train_key,), (test_key,), "kernel", kernel_key, tuple(lambdas_of(ctx)), scale, attrs=meta)


def run_score(ctx: Context, digest: str) -> None:
    fc = ctx.cfg.features
    specs, entries, kernels = [], [], {}
    for f in fc.output_functions:
        for K in fc.K:
            kkey, kernel = kernel_for(ctx, MODEL, f, K)
            kernels[kkey] = kernel
            for test_set in TEST_SETS:
                key = scores_key(ctx, test_set, f, K)
                specs.append(kernel_spec(ctx, MODEL, MODEL, test_set, f, K, key, kkey, kernel, digest=digest))
                entries.append({"method": METHOD_NAMES[f], "f": f, "K": K, "test_set": test_set, "key": key, "kind": "scores"})
            ctx.log(f"  scores {f} K={K}: {kernel.form} kernel (N x N when N < k), {len(lambdas_of(ctx))} lambdas")
    compute_scores(ctx, specs, kernels, "score")
    write_index(ctx, "score", entries, digest)


# ---- evaluate ------------------------------------------------------------------------------------
def _folds(n: int, seed: int) -> np.ndarray:
    """Fold (0 or 1) of each test sample, balanced and seeded."""
    fold = np.zeros(n, dtype=int)
    fold[np.random.default_rng(seed).permutation(n)[n // 2 :]] = 1
    return fold


def _best(per: np.ndarray) -> int:
    """Index of the lambda with the best mean per-sample LDS (0 when every value is nan)."""
    with np.errstate(all="ignore"):
        means = np.array([np.nan if np.isnan(row).all() else np.nanmean(row) for row in per])
    return int(np.nanargmax(means)) if np.isfinite(means).any() else 0


def evaluate_one(tau: Any, masks: np.ndarray, outputs: np.ndarray, lambdas: list[float] | None, folds: np.ndarray, resamples: int, seed: int) -> list[dict]:
    """LDS records for one (method, K, test set), from scores for every lambda (L, m, N).

    ``tau`` may be a Zarr array: it is read one lambda at a time (m x N), never all at once.
    ``lambdas`` None: a method without lambda (L = 1), reported under both labels.
    """
    n_lam = tau.shape[0]
    per = np.stack([lds_per_sample(np.asarray(tau[i]), masks, outputs) for i in range(n_lam)])  # (L, m)
    best = _best(per)
    oracle = lds(np.asarray(tau[best]), masks, outputs, n_resamples=resamples, seed=seed)
    chosen = [_best(per[:, folds == 1 - fold]) for fold in (0, 1)]
    crossfit = np.where((folds == 0)[:, None], np.asarray(tau[chosen[0]]), np.asarray(tau[chosen[1]]))
    held = lds(crossfit, masks, outputs, n_resamples=resamples, seed=seed)
    lam = (lambda i: None) if lambdas is None else (lambda i: lambdas[i])
    return [
        {"lambda": lam(best), "lambda_selection": "oracle", "lds_mean": 100 * oracle.boot_mean, "lds_std": 100 * oracle.boot_std,
         "lds_point": 100 * oracle.mean, "per_sample": oracle.per_sample},
        {"lambda": lam(chosen[1]), "lambda_folds": [lam(c) for c in chosen], "lambda_selection": "held-out",
         "lds_mean": 100 * held.boot_mean, "lds_std": 100 * held.boot_std, "lds_point": 100 * held.mean, "per_sample": held.per_sample},
    ]


def evaluate_predictions(pred: np.ndarray, outputs: np.ndarray, resamples: int, seed: int) -> list[dict]:
    """LDS records of cross-fitted predictions (M, m): Spearman across subsets, same bootstrap as scores.

    ``lds(-pred^T, I_M, outputs)`` is exactly the LDS of the predictions ``pred``: with the identity as
    the subset masks, the linear datamodel prediction -(I (-pred^T)^T) is ``pred`` itself.
    """
    res = lds(-pred.T, np.eye(pred.shape[0], dtype=bool), outputs, n_resamples=resamples, seed=seed)
    rec = {"lambda": None, "lds_mean": 100 * res.boot_mean, "lds_std": 100 * res.boot_std, "lds_point": 100 * res.mean, "per_sample": res.per_sample}
    return [{**rec, "lambda_selection": "oracle"}, {**rec, "lambda_selection": "held-out", "lambda_folds": [None, None]}]


def run_evaluate(ctx: Context, digest: str) -> None:
    cfg, fc, run = ctx.cfg, ctx.cfg.features, ctx.run
    masks = read_masks(ctx)
    entries = []
    for stage in SCORING_STAGES:
        if run.exists(run.score_index(stage)):
            entries += [{**e, "stage": stage} for e in run.read_json(run.score_index(stage))["entries"]]
    outputs_of = {s: read_outputs(run, s) for s in TEST_SETS}
    records = []
    for test_set in TEST_SETS:
        outputs = outputs_of[test_set]
        folds = _folds(outputs.shape[1], cfg.scoring.heldout_seed)
        for e in (e for e in entries if e["test_set"] == test_set):
            if e["kind"] == "predictions":
                recs = evaluate_predictions(run.read_array(e["key"]), outputs, cfg.lds.bootstrap_resamples, cfg.seed)
            else:
                arr = run.open_array(e["key"])
                out_key = run.outputs(test_set)  # refuse scores and ground truth of different test sets or sizes
                check_scores_vs_ground_truth(e["key"], dict(arr.attrs), arr.shape, out_key, dict(run.open_array(out_key).attrs), outputs.shape[1], masks.shape[1])
                lambdas = arr.attrs.get("lambdas")
                recs = evaluate_one(arr, masks, outputs, lambdas, folds, cfg.lds.bootstrap_resamples, cfg.seed)
            for rec in recs:
                per_sample = rec.pop("per_sample")
                records.append({
                    "method": e["method"], "f": e.get("f"), "test_set": test_set, "K": e.get("K"),
                    "k": feature_dim(cfg, 0) if fc.projector != "none" else None, "projector": fc.projector,
                    "noise": fc.noise, "num_subsets": int(masks.shape[0]), "n_test": int(outputs.shape[1]), "stage": e["stage"],
                    **({"note": e["note"]} if e.get("note") else {}),
                    **rec, "per_sample_lds": [None if np.isnan(v) else round(float(v), 5) for v in per_sample],
                })
    skipped = []
    for stage in SCORING_STAGES:
        if run.exists(run.score_index(stage)):
            skipped += run.read_json(run.score_index(stage)).get("skipped", [])
    run.write_json(run.LDS, {"digest": digest, "records": records, "skipped": skipped, **provenance(cfg)})
