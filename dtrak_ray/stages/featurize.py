"""Stage ``featurize``: projected per-sample gradients of every split, by sharded Ray actors.

Each actor loads a stored model (the base model for this stage; ensemble members and training
checkpoints for the ensemble and baselines stages, through :func:`featurize_model`) and builds the
projector once, then takes shards: contiguous row ranges aligned with the Zarr chunks of
``features/{model}/{split}/{f}-K{K}-{proj}-k{k}.zarr``. It
writes its rows straight into the arrays (no feature data passes through the driver) and marks the
shard complete after the write. A rerun computes only unmarked shards. All K of the config come
from one pass: the grids are nested, so each (sample, timestep) gradient is computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from dtrak_ray.config import ExperimentConfig
from dtrak_ray.core.diffusion import timestep_grid
from dtrak_ray.core.features import project_rows
from dtrak_ray.core.gradients import GradientComputer, select_parameters
from dtrak_ray.core.models import count_parameters
from dtrak_ray.core.projectors import make_projector
from dtrak_ray.distributed.pool import map_actors
from dtrak_ray.errors import ConfigError
from dtrak_ray.stages.common import Context, device_of, load_images, load_model, new_model, provenance, scheduler_of
from dtrak_ray.storage import RunStore

SPLITS = ("train", "val", "gen")
MODEL = "base"


@dataclass(frozen=True)
class Shard:
    split: str
    f: str
    index: int
    start: int
    stop: int
    model: str = "base"  # name of the model under features/{model}/


def gradient_dim(cfg: ExperimentConfig) -> int:
    """p, the number of parameters differentiated (all, or those ``features.parameters`` selects)."""
    model = new_model(cfg, 0)
    try:
        names = select_parameters(model, cfg.features.parameters)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return count_parameters(model) if names is None else sum(p.numel() for n, p in model.named_parameters() if n in names)


def feature_dim(cfg: ExperimentConfig, p: int) -> int:
    return p if cfg.features.projector == "none" else cfg.features.k


def stored_dim(cfg: ExperimentConfig) -> int:
    """Columns of the stored features: ``features.k``, or p without projection. Builds the model (for
    Stable Diffusion: loads it) only in that last case, where p is needed."""
    return cfg.features.k if cfg.features.projector != "none" else gradient_dim(cfg)


def features_key(run: RunStore, cfg: ExperimentConfig, split: str, f: str, K: int, k: int, model: str = MODEL) -> str:
    return run.features(model, split, f, K, cfg.features.projector, k)


def _shard_marker(cfg: ExperimentConfig, shard: Shard, k: int) -> str:
    return f"features/{shard.model}/{shard.split}/{shard.f}-{cfg.features.projector}-k{k}/shard-{shard.index:05d}"


class Featurizer:
    """Lives in one actor: the model, gradient computer and projector, built once.

    ``model_key`` is any stored model (default: the base model); ``model`` names its features
    (``features/{model}/...``); ``Ks`` are the timestep counts computed in one pass (default: the
    config's ``features.K``). The projector depends only on the config, so features of different
    models live in the same k-dimensional space.
    """

    def __init__(
        self, run: RunStore, cfg: ExperimentConfig, digest: str, model_key: str | None = None, model: str = MODEL, Ks: Sequence[int] | None = None
    ):
        self.run, self.cfg, self.digest = run, cfg, digest
        model, _ = load_model(run, model_key or run.base_model(0))
        model.to(device_of(cfg))  # the actor's GPU when the config asks for GPUs and one is visible
        self.grads = GradientComputer(model, scheduler_of(cfg), select_parameters(model, cfg.features.parameters))
        fc = cfg.features
        self.projector = make_projector(fc.projector, self.grads.dim, fc.k, fc.projector_seed)
        self.k = feature_dim(cfg, self.grads.dim)
        T = cfg.diffusion.num_train_timesteps
        self.grids = {K: timestep_grid(K, T, fc.timestep_strategy, fc.timestep_seed) for K in (Ks or fc.K)}
        self.images: dict[str, torch.Tensor] = {}
        self.sd = None
        if cfg.model.kind == "sd-lora":  # Stable Diffusion + LoRA: latents, one caption per image (stages/sd_lora.py)
            from dtrak_ray.stages.sd_lora import LatentModel

            self.sd = LatentModel(run, cfg, model_key or run.base_model(0))

    def __call__(self, shard: Shard) -> int:
        marker = _shard_marker(self.cfg, shard, self.k)
        if self.run.done(marker, self.digest):
            return 0
        self.write_rows(shard)
        self.run.mark_done(marker, digest=self.digest)
        return shard.stop - shard.start

    def write_rows(self, shard: Shard, Ks: Sequence[int] | None = None) -> None:
        """Compute the shard's rows at every K of ``Ks`` (default: all of this featurizer's) and write them
        into their arrays; completion markers are the caller's."""
        fc = self.cfg.features
        grids = self.grids if Ks is None else {K: self.grids[K] for K in Ks}
        if shard.split not in self.images:
            self.images[shard.split] = load_images(self.run, shard.split)
        x = self.images[shard.split]
        idx = list(range(shard.start, shard.stop))
        # Noise is keyed by (seed, t, sample index within the split) so features do not depend on sharding.
        if self.sd is not None:
            rows = self.sd.features(shard.split, x, idx, self.projector, shard.f, grids, fc.noise_seed, fc.noise, fc.micro_batch)
        else:
            rows = project_rows(self.grads, self.projector, x[idx], idx, shard.f, grids, fc.noise_seed, fc.noise, fc.micro_batch)
        for K, phi in rows.items():
            arr = self.run.open_array(features_key(self.run, self.cfg, shard.split, shard.f, K, self.k, shard.model), mode="r+")
            arr[shard.start : shard.stop] = phi.numpy().astype(fc.dtype)


def plan_shards(n: int, split: str, f: str, shard_size: int, model: str = MODEL) -> list[Shard]:
    return [Shard(split, f, i, s, min(s + shard_size, n), model) for i, s in enumerate(range(0, n, shard_size))]


def run_featurize(ctx: Context, digest: str) -> None:
    fc = ctx.cfg.features
    featurize_model(ctx, digest, ctx.run.base_model(0), MODEL, SPLITS, fc.output_functions, fc.K)


class _ModelsFeaturizer:
    """One actor serving shards of several stored models: a :class:`Featurizer` per model, built on first use."""

    def __init__(self, run: RunStore, cfg: ExperimentConfig, digest: str, models: dict[str, str], Ks: Sequence[int]):
        self.args, self.models, self.Ks = (run, cfg, digest), models, Ks
        self.built: dict[str, Featurizer] = {}

    def __call__(self, shard: Shard) -> int:
        if shard.model not in self.built:
            self.built[shard.model] = Featurizer(*self.args, self.models[shard.model], shard.model, self.Ks)
        return self.built[shard.model](shard)


def featurize_model(
    ctx: Context, digest: str, model_key: str, model: str, splits: Sequence[str], output_functions: Sequence[str], Ks: Sequence[int]
) -> None:
    """Features ``features/{model}/{split}/{f}-K{K}-...`` of the stored model ``model_key``, by sharded actors.

    ``digest`` identifies the inputs: arrays and shard markers made with another digest are redone.
    """
    featurize_models(ctx, digest, {model: model_key}, splits, output_functions, Ks)


def featurize_models(
    ctx: Context, digest: str, models: dict[str, str], splits: Sequence[str], output_functions: Sequence[str], Ks: Sequence[int]
) -> None:
    """:func:`featurize_model` for several models ``{name: model key}`` through one pool of actors."""
    cfg, run = ctx.cfg, ctx.run
    k = feature_dim(cfg, gradient_dim(cfg))
    Ks = tuple(sorted(set(Ks)))
    shards: list[Shard] = []
    for model, model_key in models.items():
        shards += _plan_model(ctx, digest, model_key, model, splits, output_functions, Ks, k)
    todo = [s for s in shards if not run.done(_shard_marker(cfg, s, k), digest)]
    if len(todo) < len(shards):
        ctx.log(f"  {len(shards) - len(todo)} of {len(shards)} shards already featurized: reused")
    if not todo:
        return
    names = ", ".join(models) if len(models) <= 3 else f"{len(models)} models"
    map_actors(
        partial(_ModelsFeaturizer, run, cfg, digest, models, Ks), todo, ctx.resources, f"featurize {names}",
        weight=lambda s: s.stop - s.start, unit="rows",
    )


def _plan_model(
    ctx: Context, digest: str, model_key: str, model: str, splits: Sequence[str], output_functions: Sequence[str], Ks: tuple[int, ...], k: int
) -> list[Shard]:
    """Create the (missing or stale) feature arrays of one model; its shards."""
    cfg, run, fc = ctx.cfg, ctx.run, ctx.cfg.features
    _, model_digest = load_model(run, model_key)
    shards: list[Shard] = []
    for split in splits:
        n = load_images(run, split).shape[0]
        for f in output_functions:
            for K in Ks:
                key = features_key(run, cfg, split, f, K, k, model)
                if not run.exists(key) or run.open_array(key).attrs.get("digest") != digest:
                    attrs = provenance(
                        cfg, digest=digest, split=split, output_function=f, K=K, timestep_strategy=fc.timestep_strategy, timestep_seed=fc.timestep_seed,
                        noise=fc.noise, noise_seed=fc.noise_seed, projector=fc.projector, projector_seed=fc.projector_seed,
                        k=k, model=model, model_key=model_key, model_digest=model_digest, dtype=fc.dtype,
                        parameters=list(fc.parameters or []) or "all",
                    )
                    run.create_array(key, (n, k), (fc.shard_size, k), fc.dtype, attrs)
            shards += plan_shards(n, split, f, fc.shard_size, model)
    return shards


def read_features(run: RunStore, cfg: ExperimentConfig, split: str, f: str, K: int, model: str = MODEL) -> tuple[object, dict]:
    """(n, k) float64 features of a split and their provenance attributes."""
    k = stored_dim(cfg)
    arr = run.open_array(features_key(run, cfg, split, f, K, k, model))
    return arr[...].astype("float64"), dict(arr.attrs)
