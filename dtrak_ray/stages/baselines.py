"""Stage ``baselines``: the paper's baselines (SPEC.md section 5), each a method in the LDS table.

Scores go through the same blocked engine as D-TRAK (:func:`dtrak_ray.stages.score.compute_scores`)
and are listed in ``scores/index/baselines.json``; the evaluate stage computes their LDS.

- Raw pixels (dot, cosine): flattened pixels of the stored images.
- Gradient (dot, cosine): TRAK's features, i.e. the *projected* (k = features.k, the same Gaussian
  projection) L_Simple gradients of the final base model averaged over ``baselines.K`` timesteps.
  An unscaled Gaussian projection preserves inner products up to the factor k in expectation,
  which changes no ranking.
- TracIn and GAS: projected L_Simple gradients (same projection) at the base model's stored
  training checkpoints (``RunStore.base_checkpoints``), weighted by the mean learning rate of the
  steps each checkpoint stands for; GAS uses cosine similarities.
- Relative IF and renormalized IF: TRAK's features and kernel, scores divided by
  sqrt(phi_n^T (Phi^T Phi + lam I)^-1 phi_n) or by ||phi_n|| of the train sample, every lambda.
- Journey-TRAK (Gen only): test features are the projected L_Simple gradients along the DDIM
  sampling trajectory of each generated image (``baselines.K`` of its steps); TRAK's train features
  and kernel.
- Empirical influence and datamodels (RidgeCV, cross-validated alpha): fitted on the LDS subset
  models' ground truth. To be fair they are cross-fitted over subsets: the subsets are split into
  ``baselines.folds`` folds and each fold's predictions come from a fit on the other folds.
- CLIP similarity: needs CLIP ViT-B/32 weights on local disk and the transformers package; neither
  is here, so it is skipped and the report says why.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch

from dtrak_ray.config import ExperimentConfig
from dtrak_ray.core.baselines import (
    crossfit_predictions,
    ddim_trajectory,
    interval_lrs,
    journey_gradients,
    journey_steps,
    subset_folds,
)
from dtrak_ray.core.gradients import select_parameters
from dtrak_ray.core.projectors import make_projector
from dtrak_ray.core.training import total_steps
from dtrak_ray.distributed.pool import map_tasks
from dtrak_ray.stages.common import TEST_SETS, Context, load_images, load_model, provenance, recipe_of, scheduler_of
from dtrak_ray.stages.data import read_masks
from dtrak_ray.stages.featurize import MODEL, SPLITS, features_key, featurize_models, stored_dim
from dtrak_ray.stages.groundtruth import read_outputs
from dtrak_ray.stages.score import ScoreSpec, compute_scores, kernel_for, kernel_spec, write_index
from dtrak_ray.storage import RunStore

JOURNEY = "journey"  # features/journey/gen/...: the Journey-TRAK test features
CLIP_SKIPPED = (
    "it needs CLIP ViT-B/32 weights on local disk (baselines.clip_path) and the transformers package; "
    "neither is available on this machine (no network)."
)


def baseline_K(cfg: ExperimentConfig) -> int:
    """Timesteps of the gradient-based baselines: ``baselines.K``, or the smallest of ``features.K``."""
    return cfg.baselines.K if cfg.baselines.K is not None else min(cfg.features.K)


def _images_key(run: RunStore, split: str) -> str:
    return run.GEN if split == "gen" else f"{run.INDICES}/{split}_images"


def checkpoints_used(run: RunStore, cfg: ExperimentConfig) -> list[tuple[int, str]]:
    """The base model's stored checkpoints used by TracIn/GAS, ``[(epoch, key)]``, evenly spaced.

    With none stored (a run trained before checkpoints were kept), the final model is the only one.
    """
    ckpts = run.base_checkpoints(0)
    if not ckpts:
        return [(cfg.train.epochs, run.base_model(0))]
    want = cfg.baselines.checkpoints
    if want is not None and want < len(ckpts):
        picks = sorted({int(round(v)) for v in np.linspace(0, len(ckpts) - 1, want)})
        ckpts = [ckpts[i] for i in picks]
    return ckpts


# ---- Journey-TRAK test features -------------------------------------------------------------------
def _journey_rows(rows: tuple[int, int], run: RunStore, cfg: ExperimentConfig, key: str, digest: str) -> int:
    """Journey-TRAK features of Gen images [start, stop): regenerate their trajectories, differentiate, project."""
    start, stop = rows
    marker = f"{key}/rows-{start:06d}"
    if run.done(marker, digest):
        return 0
    model, _ = load_model(run, run.base_model(0))
    sched = scheduler_of(cfg)
    g = cfg.generate
    shape = (cfg.model.channels, cfg.model.sample_size, cfg.model.sample_size)
    idx = list(range(start, stop))
    final, xs, ts = ddim_trajectory(model, sched, shape, idx, g.seed, g.ddim_steps, g.eta)
    stored = load_images(run, "gen")[start:stop]
    if not torch.allclose(final, stored, atol=1e-4):
        raise RuntimeError(f"Journey-TRAK: regenerated Gen images {start}..{stop} differ from the stored ones (max {float((final - stored).abs().max()):.2e})")
    steps = journey_steps(len(ts), baseline_K(cfg))
    names = select_parameters(model, cfg.features.parameters)
    grads = journey_gradients(model, sched, stored, xs[steps], [ts[s] for s in steps], names)
    fc = cfg.features
    projector = make_projector(fc.projector, grads.shape[1], fc.k, fc.projector_seed)
    run.open_array(key, mode="r+")[start:stop] = projector.project(grads).numpy().astype(fc.dtype)
    run.mark_done(marker, digest=digest)
    return stop - start


def journey_features(ctx: Context, digest: str) -> str:
    """Store the Journey-TRAK features of the Gen set (as model ``journey``, split ``gen``, f l_simple); their key."""
    cfg, run, fc = ctx.cfg, ctx.run, ctx.cfg.features
    k = stored_dim(cfg)
    key = features_key(run, cfg, "gen", "l_simple", baseline_K(cfg), k, JOURNEY)
    n = load_images(run, "gen").shape[0]
    if not run.exists(key) or run.open_array(key).attrs.get("digest") != digest:
        _, model_digest = load_model(run, run.base_model(0))
        attrs = provenance(cfg, digest=digest, split="gen", output_function="l_simple", K=baseline_K(cfg), trajectory="ddim",
                           ddim_steps=cfg.generate.ddim_steps, projector=fc.projector, projector_seed=fc.projector_seed, k=k, model=JOURNEY,
                           model_digest=model_digest, noise="trajectory", noise_seed=None, dtype=fc.dtype)
        run.create_array(key, (n, k), (fc.shard_size, k), fc.dtype, attrs)
    per = max(1, min(fc.shard_size, math.ceil(n / ctx.resources.workers)))
    blocks = [(s, min(s + per, n)) for s in range(0, n, per)]
    map_tasks(partial(_journey_rows, run=run, cfg=cfg, key=key, digest=digest), blocks, ctx.resources, "journey-trak features",
              weight=lambda b: b[1] - b[0], unit="images")
    return key


# ---- the stage -----------------------------------------------------------------------------------
def run_baselines(ctx: Context, digest: str) -> None:
    cfg, run, b = ctx.cfg, ctx.run, ctx.cfg.baselines
    methods = set(b.methods)
    k = stored_dim(cfg)
    K = baseline_K(cfg)
    specs: list[ScoreSpec] = []
    entries: list[dict] = []
    kernels = {}
    skipped: list[dict] = []

    def add(spec: ScoreSpec, method: str, test_set: str, K_: int | None, note: str = "") -> None:
        specs.append(spec)
        entries.append({"method": method, "f": None, "K": K_, "test_set": test_set, "key": spec.out_key, "kind": "scores", "note": note})

    def trak_key(split: str, model: str = MODEL) -> str:
        return features_key(run, cfg, split, "l_simple", K, k, model)

    no_trak = sorted(methods & {"gradient", "relative-if", "renormalized-if", "journey-trak"}) if "l_simple" not in cfg.features.output_functions else []
    for method in no_trak:
        methods.discard(method)
        skipped.append({"method": method, "reason": "it reuses TRAK's features: add l_simple to features.output_functions"})

    if "raw-pixels" in methods:
        for test_set in TEST_SETS:
            for cos, label in ((False, "dot"), (True, "cosine")):
                out = run.method_scores("pixels", test_set, label)
                add(ScoreSpec(out, (_images_key(run, "train"),), (_images_key(run, test_set),), "dot", cosine=cos,
                              attrs=provenance(cfg, digest=digest, method=f"raw pixels {label}")), f"Raw pixels ({label})", test_set, None)
    if "gradient" in methods:
        for test_set in TEST_SETS:
            for cos, label in ((False, "dot"), (True, "cosine")):
                out = run.method_scores("gradient", test_set, f"{label}-K{K}")
                add(ScoreSpec(out, (trak_key("train"),), (trak_key(test_set),), "dot", cosine=cos,
                              attrs=provenance(cfg, digest=digest, method=f"gradient {label}", features="projected l_simple")),
                    f"Gradient ({label})", test_set, K, "projected L_Simple gradients")
    if methods & {"relative-if", "renormalized-if", "journey-trak"}:
        kkey, kernel = kernel_for(ctx, MODEL, "l_simple", K)
        kernels[kkey] = kernel
        for scale, method, name in (("relative", "relative-if", "Relative IF"), ("renormalized", "renormalized-if", "Renormalized IF")):
            if method in methods:
                for test_set in TEST_SETS:
                    out = run.method_scores("base", test_set, f"{method}-K{K}")
                    add(kernel_spec(ctx, MODEL, MODEL, test_set, "l_simple", K, out, kkey, kernel, scale=scale, digest=digest, method=name),
                        name, test_set, K, "TRAK features")
        if "journey-trak" in methods:
            journey_features(ctx, digest)
            out = run.method_scores(JOURNEY, "gen", f"journey-trak-K{K}")
            add(kernel_spec(ctx, MODEL, JOURNEY, "gen", "l_simple", K, out, kkey, kernel, digest=digest, method="Journey-TRAK"),
                "Journey-TRAK", "gen", K, "Gen only")
    if methods & {"tracin", "gas"}:
        ckpts = checkpoints_used(run, cfg)
        models = {f"ckpt-e{epoch:05d}": key for epoch, key in ckpts}
        featurize_models(ctx, digest, models, SPLITS, ["l_simple"], [K])
        n_train = load_images(run, "train").shape[0]
        recipe = recipe_of(cfg)
        total = total_steps(n_train, recipe)
        per_epoch = total // cfg.train.epochs
        weights = interval_lrs([e * per_epoch for e, _ in ckpts], total, int(recipe.warmup_fraction * total), recipe.lr)
        ctx.log(f"  TracIn/GAS over {len(ckpts)} checkpoint(s) at epochs {[e for e, _ in ckpts]}, weights {[f'{w:.2e}' for w in weights]}")
        for method, name, cos in (("tracin", "TracIn", False), ("gas", "GAS", True)):
            if method in methods:
                for test_set in TEST_SETS:
                    out = run.method_scores("checkpoints", test_set, f"{method}-K{K}")
                    spec = ScoreSpec(out, tuple(trak_key("train", m) for m in models), tuple(trak_key(test_set, m) for m in models), "dot",
                                     weights=tuple(weights), cosine=cos,
                                     attrs=provenance(cfg, digest=digest, method=name, checkpoints=[key for _, key in ckpts]))
                    add(spec, name, test_set, K, f"{len(ckpts)} checkpoints, projected L_Simple gradients")
    for method, name in (("empirical-influence", "Empirical influence"), ("datamodels", "Datamodels")):
        if method in methods:
            masks = read_masks(ctx)
            folds = subset_folds(masks.shape[0], min(b.folds, masks.shape[0]), cfg.seed)
            for test_set in TEST_SETS:
                pred = crossfit_predictions(masks, read_outputs(run, test_set), method, folds, b.ridge_alphas)
                key = run.baseline_predictions(test_set, method)
                run.write_array(key, pred, provenance(cfg, digest=digest, method=name, folds=folds.tolist()))
                entries.append({"method": name, "f": None, "K": None, "test_set": test_set, "key": key, "kind": "predictions",
                                "note": f"{int(masks.shape[0])} subset models, {int(folds.max()) + 1}-fold cross-fitted over subsets"})
    if "clip" in methods:
        skipped.append({"method": "CLIP similarity", "reason": CLIP_SKIPPED})
        ctx.log(f"  CLIP similarity skipped: {CLIP_SKIPPED}")
    if specs:
        compute_scores(ctx, specs, kernels, "baselines")
    write_index(ctx, "baselines", entries, digest, skipped)
