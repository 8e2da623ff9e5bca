"""Stage ``outputs``: the LDS ground truth, L_Simple of every subset model on the Val and Gen sets.

Array ``lds/outputs-{set}.zarr`` has shape (M, seeds, noise seeds, n_test); each model's task writes
its own chunk, so tasks never write the same chunk and a rerun does only the missing models.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from dtrak_ray.config import ExperimentConfig
from dtrak_ray.core.diffusion import timestep_grid
from dtrak_ray.core.groundtruth import l_simple_outputs
from dtrak_ray.distributed.pool import map_tasks
from dtrak_ray.stages.common import TEST_SETS, Context, load_images, load_model, provenance, scheduler_of
from dtrak_ray.stages.train import ModelJob
from dtrak_ray.storage import RunStore


def _marker(job: ModelJob) -> str:
    return f"lds/outputs/subset-{job.subset:03d}-seed-{job.seed}"


def _evaluate_one(job: ModelJob, run: RunStore, cfg: ExperimentConfig, digest: str) -> None:
    if run.done(_marker(job), digest):
        return
    model, _ = load_model(run, job.key(run))
    sched = scheduler_of(cfg)
    grid = timestep_grid(cfg.lds.output_timesteps, cfg.diffusion.num_train_timesteps)
    for test_set in TEST_SETS:
        x = load_images(run, test_set)
        idx = list(range(x.shape[0]))
        out = np.stack([l_simple_outputs(model, sched, x, idx, grid, 10_000 + ns).numpy() for ns in range(cfg.lds.noise_seeds)])
        run.open_array(run.outputs(test_set), mode="r+")[job.subset, job.seed] = out
    run.mark_done(_marker(job), digest=digest)


def run_outputs(ctx: Context, digest: str) -> None:
    cfg, run = ctx.cfg, ctx.run
    lds = cfg.lds
    for test_set in TEST_SETS:
        key = run.outputs(test_set)
        n = load_images(run, test_set).shape[0]
        fresh = not run.exists(key) or run.open_array(key).attrs.get("digest") != digest
        if fresh:
            attrs = provenance(cfg, digest=digest, output_function="l_simple", timesteps=lds.output_timesteps, noise_seeds=lds.noise_seeds, test_set=test_set)
            run.create_array(key, (lds.num_subsets, lds.seeds, lds.noise_seeds, n), (1, 1, lds.noise_seeds, n), "float32", attrs)
    jobs = [ModelJob(m, s) for m in range(lds.num_subsets) for s in range(lds.seeds)]
    todo = [j for j in jobs if not run.done(_marker(j), digest)]
    map_tasks(partial(_evaluate_one, run=run, cfg=cfg, digest=digest), todo, ctx.resources, "ground truth", unit="models")


def read_outputs(run: RunStore, test_set: str) -> np.ndarray:
    """(M, n_test): outputs averaged over training seeds and noise seeds, as in SPEC.md."""
    return run.read_array(run.outputs(test_set)).mean(axis=(1, 2))
