"""Stages ``train`` (base model and LDS subset models, in parallel) and ``generate`` (Gen set)."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from dtrak_ray.config import ExperimentConfig
from dtrak_ray.core.sampling import ddim_sample
from dtrak_ray.core.training import TrainState, train_ddpm
from dtrak_ray.distributed.pool import map_tasks
from dtrak_ray.stages.common import (
    Context,
    device_of,
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


def checkpoint_every(cfg: ExperimentConfig) -> int:
    """Epochs between checkpoints: ``train.checkpoint_every``, else a quarter of the epochs."""
    return cfg.train.checkpoint_every or max(1, cfg.train.epochs // 4)


def save_checkpoint(
    run: RunStore, key: str, state: TrainState, digest: str, keep_all: bool, save_weights: Callable[[str], None]
) -> None:
    """Store a training checkpoint of the model at ``key``: its weights (``save_weights(ckpt_key)``), then
    the optimizer, scheduler, scaler and step, then the marker; older ones go unless ``keep_all``."""
    ckpt = run.checkpoint(key, state.epoch)
    save_weights(ckpt)
    buf = io.BytesIO()
    torch.save({k: v for k, v in state.to_dict().items() if k != "model"}, buf)  # the weights are saved beside
    run.write_bytes(f"{ckpt}/{run.TRAIN_STATE}", buf.getvalue())
    run.mark_done(ckpt, digest=digest, epoch=state.epoch, step=state.step)
    if not keep_all:  # a subset model needs only its latest checkpoint to resume
        for epoch, old in run.checkpoints(key):
            if epoch < state.epoch:
                run.delete(old)


def load_checkpoint(run: RunStore, ckpt: str, seed: int, weights: dict[str, torch.Tensor]) -> TrainState:
    """The training state stored at ``ckpt``, with the ``weights`` its caller loaded from there."""
    extra = torch.load(io.BytesIO(run.read_bytes(f"{ckpt}/{run.TRAIN_STATE}")), weights_only=True)
    return TrainState.from_dict({**extra, "model": weights, "seed": extra.get("seed", seed)})


def fit_and_store(
    run: RunStore,
    cfg: ExperimentConfig,
    key: str,
    seed: int,
    digest: str,
    keep_all: bool,
    n_images: int,
    fit: Callable[[TrainState | None, Callable[[TrainState], None]], list[float]],
    save_weights: Callable[[str], None],
    load_weights: Callable[[str], dict[str, torch.Tensor]],
) -> dict:
    """The bookkeeping around training one model (a UNet, or SD LoRA adapters) stored at ``key``.

    Resumes from the latest checkpoint made from the same inputs (``digest``; ``load_weights(ckpt)``
    gives its weights), calls ``fit(resume, on_checkpoint)``, stores the final weights
    (``save_weights(key)``) and the completion record, and, unless ``keep_all``, removes the
    checkpoints. Checkpoints go to ``run.checkpoint(key, epoch)`` (:func:`save_checkpoint`).
    """
    ckpts = run.checkpoints(key, digest)
    resume = load_checkpoint(run, ckpts[-1][1], seed, load_weights(ckpts[-1][1])) if ckpts else None
    losses = fit(resume, lambda state: save_checkpoint(run, key, state, digest, keep_all, save_weights))
    save_weights(key)
    record = dict(digest=digest, seed=seed, final_loss=losses[-1], n_images=n_images, resumed_from_epoch=resume.epoch if resume else 0,
                  epochs=cfg.train.epochs, device=str(device_of(cfg)))
    run.mark_done(key, **record)
    if not keep_all:
        for _, old in run.checkpoints(key):
            run.delete(old)
    return {"status": "resumed" if resume else "trained", **record}


def train_model(
    run: RunStore, cfg: ExperimentConfig, key: str, images: torch.Tensor, seed: int, digest: str, keep_all: bool = False
) -> dict:
    """Train (or resume, or skip) the model stored at ``key`` on ``images`` with the config's recipe.

    Checkpoints go to ``run.checkpoint(key, epoch)`` every :func:`checkpoint_every` epochs; a rerun
    after a crash resumes from the latest one made from the same inputs (``digest``). With
    ``keep_all`` (the base model) every checkpoint is kept; otherwise only the latest, and none once
    the model is finished. Returns the model's completion record.
    """
    if run.done(key, digest):
        return {"status": "skipped", **(run.marker(key) or {})}
    model = new_model(cfg, seed).to(device_of(cfg))

    def fit(resume: TrainState | None, on_checkpoint: Callable[[TrainState], None]) -> list[float]:
        losses = train_ddpm(
            model, scheduler_of(cfg), images, recipe_of(cfg), seed, resume=resume, checkpoint_every=checkpoint_every(cfg),
            on_checkpoint=on_checkpoint,
        )
        model.to("cpu")
        return losses

    return fit_and_store(
        run, cfg, key, seed, digest, keep_all, int(images.shape[0]), fit, partial(save_model, run, model=model),
        lambda ckpt: load_model(run, ckpt)[0].state_dict(),
    )


def _train_one(job: ModelJob, run: RunStore, cfg: ExperimentConfig, digest: str) -> str:
    if run.done(job.key(run), digest):
        return "skipped"
    images = load_images(run, "train")
    if job.subset is not None:
        mask = run.read_array(f"{run.INDICES}/masks")[job.subset]
        images = images[torch.from_numpy(mask)]
    seed = model_seed(cfg, job.subset, job.seed)
    if cfg.model.kind == "sd-lora":  # Stable Diffusion + LoRA: captions, latents (stages/sd_lora.py)
        from dtrak_ray.stages import sd_lora

        return sd_lora.train_model(run, cfg, job.key(run), job.subset, seed, digest, keep_all=job.subset is None)["status"]
    return train_model(run, cfg, job.key(run), images, seed, digest, keep_all=job.subset is None)["status"]


def model_jobs(cfg: ExperimentConfig) -> list[ModelJob]:
    """The base model first (generation waits on it), then every (subset, seed)."""
    return [ModelJob(None, 0)] + [ModelJob(m, s) for m in range(cfg.lds.num_subsets) for s in range(cfg.lds.seeds)]


def run_train(ctx: Context, digest: str) -> None:
    jobs = model_jobs(ctx.cfg)
    todo = [j for j in jobs if not ctx.run.done(j.key(ctx.run), digest)]
    if len(todo) < len(jobs):
        ctx.log(f"  {len(jobs) - len(todo)} of {len(jobs)} models already trained: reused")
    status = map_tasks(partial(_train_one, run=ctx.run, cfg=ctx.cfg, digest=digest), todo, ctx.resources, "train models", unit="models")
    if "resumed" in status:
        ctx.log(f"  {status.count('resumed')} model(s) resumed from a training checkpoint")


def _generate(indices: list[int], run: RunStore, cfg: ExperimentConfig) -> np.ndarray:
    if cfg.model.kind == "sd-lora":  # the diffusers SD pipeline with DDIM (stages/sd_lora.py)
        from dtrak_ray.stages import sd_lora

        return sd_lora.generate(indices, run, cfg, run.base_model(0))
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
