"""The sweep's feature sets: reused from the run where it has them, else computed by the featurize
stage's actor code under sweep-owned markers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from rich.console import Console

from dtrak_ray.config import ExperimentConfig
from dtrak_ray.errors import MissingArtifactError
from dtrak_ray.storage import RunStore
from dtrak_ray.sweep.common import MODEL, PREFIX_PROJECTORS, SPLITS


def source_id(f: str, K: int, k: int | None = None) -> str:
    """Key of a trial's feature source: "f/K" (prefix projectors: one set serves every k) or "f/K/k"."""
    return f"{f}/{K}" if k is None else f"{f}/{K}/{k}"


def feature_identity(cfg: ExperimentConfig, digests: Mapping[str, str], f: str, K: int, k: int) -> str:
    """Digest of everything that determines the features array (f, K, k): the model (train digest),
    the Gen set (generate digest) and every features field but the lists and the shard size."""
    fc = cfg.features.model_dump(mode="json")
    for name in ("output_functions", "K", "k", "shard_size"):
        fc.pop(name, None)
    blob = json.dumps({"features": fc, "train": digests["train"], "generate": digests["generate"], "f": f, "K": K, "k": k}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SweepShard:
    """Rows [start, stop) of one split for output function ``f``, at every K of ``Ks`` in one pass."""

    split: str
    f: str
    Ks: tuple[int, ...]
    index: int
    start: int
    stop: int


def features_key(run: RunStore, cfg: ExperimentConfig, split: str, f: str, K: int, k: int) -> str:
    """Key of the base model's features (f, K) at dimension k: the featurize stage's own key."""
    return run.features(MODEL, split, f, K, cfg.features.projector, k)


class SweepFeaturizer:
    """Lives in one actor: the featurize stage's :class:`~dtrak_ray.stages.featurize.Featurizer` (model,
    gradient computer and projector built once, from a config whose ``features.K`` / ``k`` are the
    sweep's), writing the arrays the sweep asked for under sweep-owned shard markers, so the run's own
    markers are never touched."""

    def __init__(self, run: RunStore, cfg: ExperimentConfig, digest: str):
        from dtrak_ray.stages.featurize import Featurizer

        self.run, self.cfg, self.digest = run, cfg, digest
        self.inner = Featurizer(run, cfg, digest)

    def __call__(self, shard: SweepShard) -> int:
        from dtrak_ray.stages.featurize import Shard

        marker = self.run.sweep_shard(shard.split, shard.f, shard.Ks, self.cfg.features.projector, self.inner.k, shard.index)
        if self.run.done(marker, self.digest):
            return 0
        # The stage's own computation and arrays (features_key above), under the sweep's marker.
        self.inner.write_rows(Shard(shard.split, shard.f, shard.index, shard.start, shard.stop, MODEL), shard.Ks)
        self.run.mark_done(marker, digest=self.digest)
        return shard.stop - shard.start


def _stage_marker(name: str) -> str:
    from dtrak_ray.pipeline import _marker

    return _marker(name)


def find_features(run: RunStore, cfg: ExperimentConfig, digests: Mapping[str, str], f: str, K: int, k_need: int, exact: bool) -> int | None:
    """The k of a complete stored feature set (f, K) that serves dimension ``k_need`` (equal to it if
    ``exact``, else any k >= it, by prefix), or None. The run's own features count when its featurize
    stage is done for this config; the sweep's own ones when their per-array markers say so."""
    fc = cfg.features
    fits = (lambda k: k == k_need) if exact else (lambda k: k >= k_need)
    if f in fc.output_functions and K in fc.K and fits(fc.k) and run.done(_stage_marker("featurize"), digests["featurize"]):
        return fc.k
    candidates = set.intersection(*(set(run.feature_dims(MODEL, s, f, K, fc.projector)) for s in SPLITS))
    for k in sorted(c for c in candidates if fits(c)):
        ident = feature_identity(cfg, digests, f, K, k)
        if all(run.done(features_key(run, cfg, s, f, K, k), ident) for s in SPLITS):
            return k
    return None


def compute_features(run: RunStore, cfg: ExperimentConfig, digests: Mapping[str, str], k: int, wanted: Mapping[str, Sequence[int]], resources: Any) -> None:
    """Featurize, at dimension ``k``, every (f, K) of ``wanted`` (f -> Ks) with the featurize stage's
    actors, all K of an f in one pass; each array gets a completion marker of its own."""
    from dtrak_ray.distributed.pool import map_actors
    from dtrak_ray.stages.common import load_images, load_model, provenance
    from dtrak_ray.stages.featurize import plan_shards

    fc = cfg.features
    all_K = tuple(sorted({K for Ks in wanted.values() for K in Ks}))
    # The actor's config: the run's, with the K, k and output functions of this job (all else, which
    # determines the features, unchanged; model_copy, since the run's config was validated already).
    fcfg = cfg.model_copy(update={"features": fc.model_copy(update={"K": all_K, "k": k, "output_functions": tuple(wanted)})})
    job_digest = hashlib.sha256("".join(feature_identity(cfg, digests, f, K, k) for f in wanted for K in wanted[f]).encode()).hexdigest()[:16]
    _, model_digest = load_model(run, run.base_model(0))
    shards: list[SweepShard] = []
    for split in SPLITS:
        n = load_images(run, split).shape[0]
        for f, Ks in wanted.items():
            for K in Ks:
                key = features_key(run, cfg, split, f, K, k)
                ident = feature_identity(cfg, digests, f, K, k)
                if not run.exists(key) or run.open_array(key).attrs.get("digest") != ident:
                    attrs = provenance(
                        cfg, digest=ident, split=split, output_function=f, K=K, timestep_strategy=fc.timestep_strategy,
                        timestep_seed=fc.timestep_seed, noise=fc.noise, noise_seed=fc.noise_seed, projector=fc.projector,
                        projector_seed=fc.projector_seed, k=k, model=MODEL, model_digest=model_digest, dtype=fc.dtype, made_by="sweep",
                    )
                    run.create_array(key, (n, k), (fc.shard_size, k), fc.dtype, attrs)
            shards += [SweepShard(split, f, tuple(Ks), s.index, s.start, s.stop) for s in plan_shards(n, split, f, fc.shard_size)]
    map_actors(partial(SweepFeaturizer, run, fcfg, job_digest), shards, resources, f"featurize k={k}", weight=lambda s: s.stop - s.start, unit="rows")
    for split in SPLITS:
        for f, Ks in wanted.items():
            for K in Ks:
                run.mark_done(features_key(run, cfg, split, f, K, k), digest=feature_identity(cfg, digests, f, K, k))


def ensure_features(run: RunStore, cfg: ExperimentConfig, digests: Mapping[str, str], resources: Any, console: Console) -> dict[str, int]:
    """Source k of every feature set the sweep needs, computing the missing ones (``source_id`` -> k)."""
    sw, fc = cfg.sweep, cfg.features
    prefix = fc.projector in PREFIX_PROJECTORS
    needs = [(f, K, max(sw.k)) for f in sw.output_functions for K in sw.K] if prefix else [
        (f, K, k) for f in sw.output_functions for K in sw.K for k in sw.k]
    sources: dict[str, int] = {}
    missing: dict[int, dict[str, list[int]]] = {}
    for f, K, k in needs:
        sid = source_id(f, K) if prefix else source_id(f, K, k)
        found = find_features(run, cfg, digests, f, K, k, exact=not prefix)
        if found is None and f in fc.output_functions and K in fc.K and k == fc.k:
            # Those arrays belong to the run's featurize stage, which has not finished: never write into them.
            raise MissingArtifactError(
                f"the run's features {f} K={K} k={k} are not complete (its featurize stage has not finished for this config): "
                f"finish the run with `dtrak-ray run CONFIG --store {run.store.url}` first"
            )
        if found is None:
            missing.setdefault(k, {}).setdefault(f, []).append(K)
            sources[sid] = k
        else:
            sources[sid] = found
            console.print(f"  features {f} K={K}: reused (stored k={found}{', prefix' if prefix and found > k else ''})")
    for k, wanted in sorted(missing.items()):
        console.print(f"  features to compute at k={k}: " + ", ".join(f"{f} K={Ks}" for f, Ks in wanted.items()))
        compute_features(run, cfg, digests, k, wanted, resources)
    return sources
