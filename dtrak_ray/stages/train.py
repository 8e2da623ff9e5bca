"""Stages ``train`` (base model and LDS subset models, in parallel) and ``generate`` (Gen set)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from dtrak_ray.config import ExperimentConfig
from dtrak_ray.core.sampling import ddim_sample
from dtrak_ray.core.training import train_ddpm
from dtrak_ray.distributed.pool import map_tasks
from dtrak_ray.stages.common import (
    Context,
    load_images,
    load_model,
    model_seed,
    new_model,
    provenance,
    recipe_of,
    save_model,
    scheduler_of,
)
from dtrak_ray.storage import RunStore


@dataclass(frozen=True)
class ModelJob:
    """One model to train: the base model (subset None) or subset ``subset`` with seed index ``seed``."""

    subset: int | None
    seed: int

    def key(self, run: RunStore) -> str:
        return run.base_model(self.seed) if self.subset is None else run.subset_model(self.subset, self.seed)


def _train_one(job: ModelJob, run: RunStore, cfg: ExperimentConfig, digest: str) -> str:
    key = job.key(run)
    if run.done(key, digest):
        return "skipped"
    images = load_images(run, "train")
    if job.subset is not None:
        mask = run.read_array(f"{run.INDICES}/masks")[job.subset]
        images = images[torch.from_numpy(mask)]
    seed = model_seed(cfg, job.subset, job.seed)
    model = new_model(cfg, seed)
    losses = train_ddpm(model, scheduler_of(cfg), images, recipe_of(cfg), seed)
    save_model(run, key, model)
    run.mark_done(key, digest=digest, seed=seed, final_loss=losses[-1], n_images=int(images.shape[0]))
    return "trained"


def model_jobs(cfg: ExperimentConfig) -> list[ModelJob]:
    """The base model first (generation waits on it), then every (subset, seed)."""
    return [ModelJob(None, 0)] + [ModelJob(m, s) for m in range(cfg.lds.num_subsets) for s in range(cfg.lds.seeds)]


def run_train(ctx: Context, digest: str) -> None:
    jobs = model_jobs(ctx.cfg)
    todo = [j for j in jobs if not ctx.run.done(j.key(ctx.run), digest)]
    if len(todo) < len(jobs):
        ctx.log(f"  {len(jobs) - len(todo)} of {len(jobs)} models already trained: reused")
    map_tasks(partial(_train_one, run=ctx.run, cfg=ctx.cfg, digest=digest), todo, ctx.resources, "train models", unit="models")


def _generate(indices: list[int], run: RunStore, cfg: ExperimentConfig) -> np.ndarray:
    model, _ = load_model(run, run.base_model(0))
    g = cfg.generate
    shape = (cfg.model.channels, cfg.model.sample_size, cfg.model.sample_size)
    return ddim_sample(model, scheduler_of(cfg), shape, indices, g.seed, g.ddim_steps, g.eta).numpy()


def run_generate(ctx: Context, digest: str) -> None:
    g = ctx.cfg.generate
    per = max(1, -(-g.n_samples // ctx.resources.workers))
    chunks = [list(range(s, min(s + per, g.n_samples))) for s in range(0, g.n_samples, per)]
    parts = map_tasks(partial(_generate, run=ctx.run, cfg=ctx.cfg), chunks, ctx.resources, "generate", weight=len, unit="images")
    _, model_digest = load_model(ctx.run, ctx.run.base_model(0))
    attrs = provenance(ctx.cfg, sampler="ddim", steps=g.ddim_steps, eta=g.eta, seed=g.seed, model_digest=model_digest)
    ctx.run.write_array(ctx.run.GEN, np.concatenate(parts).astype(np.float32), attrs)
