"""Stages ``score`` (attribution scores for every lambda) and ``evaluate`` (LDS, lambda selection).

``score``: for each output function and K, one factorization of the training Gram matrix (the
N x N form when N < k, else k x k; recorded) serves all lambdas of the grid; scores (L, n_test, N)
go to ``scores/base/{set}/...zarr``, one chunk per lambda.
``evaluate``: LDS of every (method, K, test set) under two labelled lambda protocols:
- ``oracle`` (the paper's): the lambda with the best mean LDS on the evaluation samples themselves;
- ``held-out`` (fair): the test samples are split in two folds; each fold is scored with the
  lambda that is best on the other fold (cross-fitting), so no sample chooses its own lambda.
"""

from __future__ import annotations

import numpy as np

from dtrak_ray.core.kernel import fit_kernel, lambda_grid, scores_for_lambdas
from dtrak_ray.core.lds import lds, lds_per_sample
from dtrak_ray.core.outputs import METHOD_NAMES
from dtrak_ray.stages.common import TEST_SETS, Context, provenance
from dtrak_ray.stages.data import read_masks
from dtrak_ray.stages.featurize import MODEL, feature_dim, read_features
from dtrak_ray.stages.groundtruth import read_outputs


def lambdas_of(ctx: Context) -> list[float]:
    return list(ctx.cfg.scoring.lambdas or lambda_grid())


def scores_key(ctx: Context, test_set: str, f: str, K: int) -> str:
    fc = ctx.cfg.features
    return ctx.run.scores(MODEL, test_set, f, K, fc.projector, fc.k if fc.projector != "none" else 0)


def run_score(ctx: Context, digest: str) -> None:
    fc = ctx.cfg.features
    lambdas = lambdas_of(ctx)
    for f in fc.output_functions:
        for K in fc.K:
            phi_train, attrs = read_features(ctx.run, ctx.cfg, "train", f, K)
            kernel = fit_kernel(phi_train)
            for test_set in TEST_SETS:
                phi_test, test_attrs = read_features(ctx.run, ctx.cfg, test_set, f, K)
                tau = scores_for_lambdas(kernel, phi_train, phi_test, lambdas).astype(np.float32)
                meta = provenance(
                    ctx.cfg, digest=digest, test_set=test_set, lambdas=lambdas, kernel_form=kernel.form,
                    **{k: attrs[k] for k in ("output_function", "K", "noise", "noise_seed", "projector", "projector_seed", "k", "model_digest")},
                )
                ctx.run.write_array(scores_key(ctx, test_set, f, K), tau, meta, chunks=(1, *tau.shape[1:]))
            ctx.log(f"  scores {f} K={K}: {kernel.form} kernel, {len(lambdas)} lambdas")


def _folds(n: int, seed: int) -> np.ndarray:
    """Fold (0 or 1) of each test sample, balanced and seeded."""
    fold = np.zeros(n, dtype=int)
    fold[np.random.default_rng(seed).permutation(n)[n // 2 :]] = 1
    return fold


def evaluate_one(tau: np.ndarray, masks: np.ndarray, outputs: np.ndarray, lambdas: list[float], folds: np.ndarray, resamples: int, seed: int) -> list[dict]:
    """LDS records for one (method, K, test set), from scores for every lambda (L, m, N)."""
    per = np.stack([lds_per_sample(tau[i], masks, outputs) for i in range(len(lambdas))])  # (L, m)
    means = np.nanmean(per, axis=1)
    best = int(np.nanargmax(means))
    oracle = lds(tau[best], masks, outputs, n_resamples=resamples, seed=seed)
    chosen = [int(np.nanargmax(np.nanmean(per[:, folds == 1 - fold], axis=1))) for fold in (0, 1)]
    crossfit = np.where((folds == 0)[:, None], tau[chosen[0]], tau[chosen[1]])
    held = lds(crossfit, masks, outputs, n_resamples=resamples, seed=seed)
    return [
        {"lambda": lambdas[best], "lambda_selection": "oracle", "lds_mean": 100 * oracle.boot_mean, "lds_std": 100 * oracle.boot_std,
         "lds_point": 100 * oracle.mean, "per_sample": oracle.per_sample},
        {"lambda": lambdas[chosen[1]], "lambda_folds": [lambdas[c] for c in chosen], "lambda_selection": "held-out",
         "lds_mean": 100 * held.boot_mean, "lds_std": 100 * held.boot_std, "lds_point": 100 * held.mean, "per_sample": held.per_sample},
    ]


def run_evaluate(ctx: Context, digest: str) -> None:
    cfg, fc = ctx.cfg, ctx.cfg.features
    masks = read_masks(ctx)
    lambdas = lambdas_of(ctx)
    records = []
    for test_set in TEST_SETS:
        outputs = read_outputs(ctx.run, test_set)
        folds = _folds(outputs.shape[1], cfg.scoring.heldout_seed)
        for f in fc.output_functions:
            for K in fc.K:
                tau = ctx.run.read_array(scores_key(ctx, test_set, f, K))
                for rec in evaluate_one(tau, masks, outputs, lambdas, folds, cfg.lds.bootstrap_resamples, cfg.seed):
                    per_sample = rec.pop("per_sample")
                    records.append({
                        "method": METHOD_NAMES[f], "f": f, "test_set": test_set, "K": K,
                        "k": feature_dim(cfg, 0) if fc.projector != "none" else None, "projector": fc.projector,
                        "noise": fc.noise, "num_subsets": int(masks.shape[0]), "n_test": int(outputs.shape[1]),
                        **rec, "per_sample_lds": [None if np.isnan(v) else round(float(v), 5) for v in per_sample],
                    })
    ctx.run.write_json(ctx.run.LDS, {"digest": digest, "records": records, **provenance(cfg)})
