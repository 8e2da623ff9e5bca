"""Stage ``ensemble``: D-TRAK scores averaged over S models, each trained on a random half (SPEC.md 2).

For the largest S of ``ensemble.sizes``, S members are trained (Ray tasks, the config's recipe,
with the training stage's checkpoint/resume) on seeded random subsets of ``ensemble.alpha`` of the
training set (stratified by class, masks in ``data/ensemble.zarr/masks``), featurized with the
shared projector (one actor pool for all members), and scored against their own kernel, every
lambda. The ensemble of size S averages the scores of members 0..S-1 at each lambda; it is listed
as "D-TRAK ensemble S=s" (or the output function's method name) in the LDS table.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from dtrak_ray.config import ExperimentConfig
from dtrak_ray.core.diffusion import mix_seed
from dtrak_ray.core.kernel import merge_topk
from dtrak_ray.core.outputs import METHOD_NAMES
from dtrak_ray.data import subset_masks
from dtrak_ray.distributed.pool import map_tasks
from dtrak_ray.stages.common import TEST_SETS, Context, load_images, provenance
from dtrak_ray.stages.featurize import SPLITS, featurize_models
from dtrak_ray.stages.score import compute_scores, kernel_for, kernel_spec, write_index
from dtrak_ray.stages.train import train_model
from dtrak_ray.storage import RunStore

# Salt of the members' seeds, so they never coincide with the base or LDS subset models' seeds.
_SALT = 0xE5E


def member_name(j: int) -> str:
    return f"ensemble-{j:02d}"


def member_seed(cfg: ExperimentConfig, j: int) -> int:
    return mix_seed(cfg.ensemble.seed, _SALT, j) % (2**31)


def member_masks(labels: np.ndarray, n_members: int, alpha: float, seed: int) -> np.ndarray:
    """(S, N) membership of each ensemble member: alpha of every class, seeded."""
    return subset_masks(labels, n_members, alpha, mix_seed(seed, _SALT))


def _train_member(j: int, run: RunStore, cfg: ExperimentConfig, digest: str) -> str:
    mask = run.read_array(run.ENSEMBLE_MASKS)[j]
    images = load_images(run, "train")[torch.from_numpy(mask)]
    return train_model(run, cfg, run.ensemble_model(j), images, member_seed(cfg, j), digest)["status"]


def ensemble_label(f: str, size: int) -> str:
    return f"{METHOD_NAMES[f]} ensemble S={size}"


def _average(run: RunStore, members: list[str], out_key: str, attrs: dict, top: int, block: int) -> None:
    """Mean over member score arrays (L, m, N), one (lambda, test block) at a time; top-k beside it."""
    arrs = [run.open_array(k) for k in members]
    n_lam, m, n = arrs[0].shape
    chunks = arrs[0].chunks
    out = run.create_array(out_key, (n_lam, m, n), chunks, "float32", attrs)
    top = min(top, n)
    tops = {name: run.create_array(f"{run.top_of(out_key)}/{name}", (n_lam, m, top), (n_lam, chunks[1], top), dtype, attrs)
            for name, dtype in (("indices", "int64"), ("values", "float32"))}
    for a in range(0, m, block):
        b = min(a + block, m)
        vals = idx = None
        for s in range(0, n, chunks[2]):
            e = min(s + chunks[2], n)
            mean = np.mean([np.asarray(arr[:, a:b, s:e], dtype=np.float64) for arr in arrs], axis=0)
            out[:, a:b, s:e] = mean.astype(np.float32)
            vals, idx = merge_topk(vals, idx, mean, np.arange(s, e), top)
        tops["indices"][:, a:b] = idx
        tops["values"][:, a:b] = vals.astype(np.float32)


def run_ensemble(ctx: Context, digest: str) -> None:
    cfg, run, e = ctx.cfg, ctx.run, ctx.cfg.ensemble
    if not e.sizes:
        write_index(ctx, "ensemble", [], digest)
        return
    n_members = max(e.sizes)
    labels = run.read_array(f"{run.INDICES}/train_labels")
    masks = member_masks(labels, n_members, e.alpha, e.seed)
    run.write_array(run.ENSEMBLE_MASKS, masks, provenance(cfg, alpha=e.alpha, seed=e.seed))
    members = list(range(n_members))
    todo = [j for j in members if not run.done(run.ensemble_model(j), digest)]
    map_tasks(partial(_train_member, run=run, cfg=cfg, digest=digest), todo, ctx.resources, "train ensemble members", unit="models")
    models = {member_name(j): run.ensemble_model(j) for j in members}
    f, K = e.output_function, e.K if e.K is not None else max(cfg.features.K)
    featurize_models(ctx, digest, models, SPLITS, [f], [K])
    specs, kernels, member_keys = [], {}, {}
    for j in members:
        kkey, kernel = kernel_for(ctx, member_name(j), f, K)
        kernels[kkey] = kernel
        for test_set in TEST_SETS:
            out = run.method_scores(member_name(j), test_set, f"{f}-K{K}")
            member_keys[(j, test_set)] = out
            specs.append(kernel_spec(ctx, member_name(j), member_name(j), test_set, f, K, out, kkey, kernel, digest=digest, member=j))
    compute_scores(ctx, specs, kernels, "score ensemble members")
    entries = []
    for size in e.sizes:
        for test_set in TEST_SETS:
            keys = [member_keys[(j, test_set)] for j in range(size)]
            out = run.method_scores(f"ensemble-S{size}", test_set, f"{f}-K{K}")
            attrs = {**dict(run.open_array(keys[0]).attrs), "ensemble_size": size, "members": keys, "digest": digest}
            _average(run, keys, out, attrs, cfg.scoring.top_k, cfg.scoring.test_block)
            entries.append({"method": ensemble_label(f, size), "f": None, "K": K, "test_set": test_set, "key": out, "kind": "scores",
                            "note": f"{size} model(s), each on {e.alpha:.0%} of the training set"})
    ctx.log(f"  ensembles of {list(e.sizes)} members ({METHOD_NAMES[f]}, K={K}) scored")
    write_index(ctx, "ensemble", entries, digest)
