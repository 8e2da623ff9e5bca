"""The sweep: held-out LDS over projection dimension k, timesteps K, output function f and lambda.

Runs on a finished run (``dtrak-ray run``): it needs the run's data, models, Gen set and LDS ground
truth, and reuses its features. One trial is one (f, K, k); lambda is searched inside the trial,
because one factorization of the training Gram matrix serves every lambda (core/kernel.py), so a
lambda grid costs a rescale per value rather than a trial per value.

Interface:
- :func:`evaluate_features` ``(phi_train, phi_tests, masks, outputs, lambdas, splits, ...) -> dict``: the
  objective of one trial as a plain function of arrays (no Ray, no store).
- :class:`HeldoutSplit` / :func:`heldout_split`: which test samples (or LDS subsets) choose lambda and
  which ones measure the LDS.
- :func:`run_trial` ``(params, inputs) -> dict``: read one (f, K) feature set from the store, keep its
  first k columns, call :func:`evaluate_features`. This is what a Ray Tune trial runs.
- :func:`ensure_features`: the feature sets the sweep needs, reused from the run where it has them,
  else computed by the featurize stage's actor code (:class:`dtrak_ray.stages.featurize.Featurizer`).
- :func:`run_sweep`: all of it, then ``results/sweep.json``, ``report/sweep.md`` and ``report/sweep.png``.

Held-out protocol (the objective). For each test set, a seeded split puts ``selection_fraction`` of
the test samples (``lambda_selection: samples``) or of the LDS subsets (``subsets``) in a selection
part; lambda is the grid value with the best mean LDS there, and the objective is the LDS at that
lambda on the other part, with a bootstrap over subsets. Both numbers are reported, with the oracle
value (best lambda on the held-out part itself, the paper's optimistic protocol) for reference.

Feature reuse. The Gaussian and Rademacher projectors draw P in fixed-width column tiles, so the first
k' columns of a k-projection ARE the k'-projection (tests check it): the largest k's features serve
every smaller k by their prefix. Other projectors (sjlt, trak-cuda) are featurized at each k.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from rich.console import Console

from dtrak_ray import __version__
from dtrak_ray.config import ExperimentConfig, config_diff, parse_config
from dtrak_ray.core.kernel import fit_kernel, lambda_grid, scores_for_lambdas
from dtrak_ray.core.lds import lds, lds_per_sample
from dtrak_ray.errors import ConfigError, MissingArtifactError, RunConflictError
from dtrak_ray.storage import RunStore, Store

# This module is imported by every Tune trial: it must not load torch or diffusers at import time (on a
# busy machine that costs a trial tens of seconds), so the stages are imported inside the driver's
# functions and these two constants mirror theirs (stages.common.TEST_SETS, stages.featurize.MODEL;
# the tests check they agree).
TEST_SETS = ("val", "gen")
MODEL = "base"
SPLITS = ("train", *TEST_SETS)

# Projectors whose first k' columns at dimension k equal the k'-projection (column tiles of fixed width).
PREFIX_PROJECTORS = ("gaussian", "rademacher")
# Stages whose outputs the sweep reads (featurize: reused when done), and the other config fields it uses.
_NEEDED_STAGES = ("data", "train", "generate", "outputs")
_READ_STAGES = (*_NEEDED_STAGES, "featurize")
_READ_FIELDS = ("seed", "lds", "scoring")


# ---- the held-out split ------------------------------------------------------------------------
@dataclass(frozen=True)
class HeldoutSplit:
    """Which part of a test set chooses lambda. ``by`` is "samples" (columns of tau and outputs) or
    "subsets" (rows of masks and outputs); ``select`` and ``heldout`` are disjoint index arrays."""

    by: str
    select: np.ndarray
    heldout: np.ndarray

    def part(self, tau: np.ndarray, masks: np.ndarray, outputs: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tau (m', N), masks (M', N), outputs (M', m')) restricted to the ``which`` part ("select" or "heldout")."""
        idx = self.select if which == "select" else self.heldout
        if self.by == "samples":
            return tau[idx], masks, outputs[:, idx]
        return tau, masks[idx], outputs[idx]


def heldout_split(by: str, n_test: int, n_subsets: int, fraction: float, seed: int) -> HeldoutSplit:
    """Seeded split of the test samples (``by="samples"``) or LDS subsets (``"subsets"``) into a
    selection part (``round(fraction * n)`` items) and a held-out part (the rest)."""
    n = n_test if by == "samples" else n_subsets
    # A Spearman correlation over fewer than 3 subsets is +-1 whatever the scores: no information.
    least = 1 if by == "samples" else 3
    n_sel = int(round(fraction * n))
    if n_sel < least or n - n_sel < least:
        what = f"{n} test samples" if by == "samples" else f"{n} LDS subsets"
        raise ConfigError(
            f"sweep.selection_fraction={fraction} splits {what} into {n_sel} + {n - n_sel}: each part needs at least {least}; "
            f"choose a fraction nearer 0.5{' or sweep.lambda_selection=samples' if by == 'subsets' else ''}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return HeldoutSplit(by, np.sort(perm[:n_sel]), np.sort(perm[n_sel:]))


# ---- the objective of one trial ----------------------------------------------------------------
def _best(curve: np.ndarray) -> int:
    """Index of the largest finite value (a lambda whose LDS is undefined never wins)."""
    return int(np.argmax(np.where(np.isfinite(curve), curve, -np.inf)))


def evaluate_features(
    phi_train: np.ndarray,
    phi_tests: Mapping[str, np.ndarray],
    masks: np.ndarray,
    outputs: Mapping[str, np.ndarray],
    lambdas: Sequence[float],
    splits: Mapping[str, HeldoutSplit],
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Held-out LDS of one feature set, for every test set.

    Args:
        phi_train: (N, k) train features.
        phi_tests: test set -> (m, k) features.
        masks: (M, N) LDS subset masks.
        outputs: test set -> (M, m) ground-truth losses (averaged over seeds).
        lambdas: L ridge values searched.
        splits: test set -> its :class:`HeldoutSplit`.
        resamples, seed: the bootstrap over subsets of the held-out LDS.

    Returns:
        Flat metrics, LDS in %: per test set ``s``: ``{s}_lambda`` (chosen on the selection part),
        ``{s}_lds_select`` (its LDS there), ``{s}_lds`` / ``{s}_lds_std`` (bootstrap mean and std of the
        held-out LDS at that lambda), ``{s}_lds_point`` (plain mean), ``{s}_lds_oracle`` and
        ``{s}_lambda_oracle`` (best lambda on the held-out part itself), ``{s}_curve_select`` and
        ``{s}_curve_heldout`` (mean LDS per lambda), plus ``kernel_form``.
    """
    kernel = fit_kernel(phi_train)  # one factorization for every lambda and test set
    out: dict[str, Any] = {"kernel_form": kernel.form, "lambdas": [float(v) for v in lambdas]}
    for s, phi_test in phi_tests.items():
        tau = scores_for_lambdas(kernel, phi_train, phi_test, lambdas)  # (L, m, N)
        split = splits[s]
        curves = {}
        for which in ("select", "heldout"):
            per = [lds_per_sample(*split.part(tau[i], masks, outputs[s], which)) for i in range(len(lambdas))]
            with np.errstate(all="ignore"):
                curves[which] = np.array([np.nanmean(p) if np.isfinite(p).any() else np.nan for p in per])
        chosen, oracle = _best(curves["select"]), _best(curves["heldout"])
        held = lds(*split.part(tau[chosen], masks, outputs[s], "heldout"), n_resamples=resamples, seed=seed)
        out |= {
            f"{s}_lambda": float(lambdas[chosen]),
            f"{s}_lds_select": 100 * float(curves["select"][chosen]),
            f"{s}_lds": 100 * held.boot_mean,
            f"{s}_lds_std": 100 * held.boot_std,
            f"{s}_lds_point": 100 * held.mean,
            f"{s}_lambda_oracle": float(lambdas[oracle]),
            f"{s}_lds_oracle": 100 * float(curves["heldout"][oracle]),
            f"{s}_curve_select": [None if np.isnan(v) else round(100 * float(v), 4) for v in curves["select"]],
            f"{s}_curve_heldout": [None if np.isnan(v) else round(100 * float(v), 4) for v in curves["heldout"]],
        }
    return out


# ---- one trial, reading the store --------------------------------------------------------------
@dataclass(frozen=True)
class TrialInputs:
    """What every trial shares (shipped once to the object store by Tune's ``with_parameters``)."""

    run: RunStore
    cfg: ExperimentConfig
    masks: np.ndarray
    outputs: dict[str, np.ndarray]
    lambdas: tuple[float, ...]
    splits: dict[str, HeldoutSplit]
    sources: dict[str, int] = field(default_factory=dict)  # "f/K" (k per trial for non-prefix projectors: "f/K/k") -> stored k


def source_id(f: str, K: int, k: int | None = None) -> str:
    return f"{f}/{K}" if k is None else f"{f}/{K}/{k}"


def run_trial(params: Mapping[str, Any], inputs: TrialInputs) -> dict[str, Any]:
    """One (f, K, k): the first k columns of the stored features, then :func:`evaluate_features`."""
    f, K, k = str(params["f"]), int(params["K"]), int(params["k"])
    cfg = inputs.cfg
    prefix = cfg.features.projector in PREFIX_PROJECTORS
    k_src = inputs.sources[source_id(f, K) if prefix else source_id(f, K, k)]
    phis = {}
    for split in SPLITS:
        arr = inputs.run.open_array(features_key(inputs.run, cfg, split, f, K, k_src))
        phis[split] = np.asarray(arr[:, :k], dtype=np.float64)
    metrics = evaluate_features(
        phis.pop("train"), phis, inputs.masks, inputs.outputs, inputs.lambdas, inputs.splits, cfg.lds.bootstrap_resamples, cfg.seed
    )
    return {"f": f, "K": K, "k": k, "k_source": k_src,
            "objective": metrics[f"{cfg.sweep.objective}_lds"], **metrics}


# ---- features: reuse, or compute with the featurize stage's actor -------------------------------
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


# ---- the sweep ---------------------------------------------------------------------------------
def check_run(run: RunStore, cfg: ExperimentConfig) -> dict[str, str]:
    """Refuse a sweep on a missing run, on a run made with another config, or before its ground truth
    exists; returns the run's stage digests."""
    from dtrak_ray.pipeline import stage_digests

    if not run.exists(run.CONFIG):
        raise MissingArtifactError(
            f"run {cfg.name!r} not found in {run.store.url}: the sweep works on a finished run; "
            f"run `dtrak-ray run CONFIG --store {run.store.url}` first"
        )
    import yaml

    from dtrak_ray.pipeline import BY_NAME

    stored = parse_config(yaml.safe_load(run.read_text(run.CONFIG)), source=run.url(run.CONFIG))
    # Only the fields that made what the sweep reads must match; other sections (report, baselines, ...) are free.
    read = {sec for name in _READ_STAGES for sec in BY_NAME[name].sections} | set(_READ_FIELDS)
    diff = [d for d in config_diff(stored, cfg) if any(d == sec or d.startswith(sec + ".") for sec in read)]
    if diff:
        raise RunConflictError(
            f"run {cfg.name!r} in {run.store.url} was made with a different config ({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''} "
            "differ), and the sweep reads what those fields made: use the run's config, or sweep another run"
        )
    digests = stage_digests(cfg)
    missing = [s for s in _NEEDED_STAGES if not run.done(_stage_marker(s), digests[s])]
    if missing:
        raise MissingArtifactError(
            f"the sweep needs stage(s) {missing} of run {cfg.name!r} first: run `dtrak-ray run CONFIG --store {run.store.url}`"
        )
    if cfg.features.projector == "none":
        raise ConfigError("features.projector=none has no projection dimension to sweep: set features.projector=gaussian")
    return digests


def run_sweep(cfg: ExperimentConfig, store_url: str, address: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the whole sweep on the finished run ``cfg.name``; returns the document written to ``results/sweep.json``."""
    from dtrak_ray.distributed.cluster import connect
    from dtrak_ray.distributed.tune import tune_grid
    from dtrak_ray.pipeline import resources_of
    from dtrak_ray.stages.groundtruth import read_outputs

    console = console or Console()
    store = Store(store_url)
    if store.is_local:  # trials run in Tune's trial directories: a relative store URL would move with them
        store = Store(store.root, store.storage_options)
    run = store.run(cfg.name)
    digests = check_run(run, cfg)
    sw = cfg.sweep
    masks = run.read_array(f"{run.INDICES}/masks")
    outputs = {s: read_outputs(run, s) for s in TEST_SETS}
    splits = {s: heldout_split(sw.lambda_selection, outputs[s].shape[1], masks.shape[0], sw.selection_fraction, sw.split_seed) for s in TEST_SETS}
    lambdas = tuple(sw.lambdas or cfg.scoring.lambdas or lambda_grid())
    connect(address, cfg.resources.num_workers)
    resources = resources_of(cfg)
    console.print(f"[bold]sweep[/] {cfg.name} -> {run.url()}: f {list(sw.output_functions)} x K {list(sw.K)} x k {list(sw.k)}, "
                  f"{len(lambdas)} lambdas chosen on held-out {sw.lambda_selection}")
    t0 = time.perf_counter()
    sources = ensure_features(run, cfg, digests, resources, console)
    inputs = TrialInputs(run, cfg, masks, outputs, lambdas, splits, sources)
    space = {"f": list(sw.output_functions), "K": list(sw.K), "k": list(sw.k)}
    tune_path = run.local_path(run.SWEEP_TUNE)
    trials = tune_grid(run_trial, inputs, space, metric="objective", resources=resources, storage_path=tune_path, name=f"sweep-{cfg.name}")
    from dtrak_ray.core.outputs import METHOD_NAMES

    trials = [{"method": METHOD_NAMES[t["f"]], **t} for t in trials]
    trials.sort(key=lambda t: -np.nan_to_num(t["objective"], nan=-np.inf))
    doc = {
        "run": cfg.name, "code_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - t0, 1), "objective": f"{sw.objective} held-out LDS %",
        "sweep": cfg.sweep.model_dump(mode="json"), "lambdas": list(lambdas),
        "split": {s: {"by": sp.by, "select": sp.select.tolist(), "heldout": sp.heldout.tolist()} for s, sp in splits.items()},
        "projector": cfg.features.projector, "feature_sources": sources, "tune_storage": tune_path,
        "urls": {"json": run.url(run.SWEEP), "md": run.url(run.report_file("sweep.md")), "png": run.url(run.report_file("sweep.png"))},
        "best": {k: trials[0][k] for k in ("method", "f", "K", "k", f"{sw.objective}_lambda", "objective", f"{sw.objective}_lds_std")},
        "trials": trials,
    }
    run.write_json(run.SWEEP, doc)
    run.write_bytes(run.report_file("sweep.png"), sweep_figure(doc))
    run.write_text(run.report_file("sweep.md"), sweep_markdown(doc))
    return doc


# ---- report ------------------------------------------------------------------------------------
def best_line(doc: Mapping[str, Any]) -> str:
    """One sentence naming the best configuration."""
    b, s = doc["best"], doc["sweep"]["objective"]
    return (f"{b['method']} (f = {b['f']}), K = {b['K']}, k = {b['k']}, lambda = {b[f'{s}_lambda']:g}: "
            f"held-out {s.capitalize()} LDS {b['objective']:.2f} ± {b[f'{s}_lds_std']:.2f} %")


def sweep_table(doc: Mapping[str, Any]) -> str:
    """Markdown table, one row per trial, best first."""
    obj = doc["sweep"]["objective"]
    head = ["#", "method", "f", "K", "k"]
    for s in TEST_SETS:
        head += [f"{s.capitalize()} λ", f"{s.capitalize()} LDS % selection part", f"{s.capitalize()} LDS % held-out"]
    head.append(f"{obj.capitalize()} LDS % held-out, oracle λ")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(doc["trials"], 1):
        row = [str(i), t["method"], t["f"], str(t["K"]), str(t["k"])]
        for s in TEST_SETS:
            row += [f"{t[f'{s}_lambda']:g}", f"{t[f'{s}_lds_select']:.2f}", f"{t[f'{s}_lds']:.2f} ± {t[f'{s}_lds_std']:.2f}"]
        row.append(f"{t[f'{obj}_lds_oracle']:.2f} (λ={t[f'{obj}_lambda_oracle']:g})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sweep_markdown(doc: Mapping[str, Any]) -> str:
    sw, obj = doc["sweep"], doc["sweep"]["objective"]
    best = doc["trials"][0]
    close = [t for t in doc["trials"][1:] if best["objective"] - t["objective"] <= best[f"{obj}_lds_std"]]
    part = "test samples" if sw["lambda_selection"] == "samples" else "LDS subsets"
    md = [
        f"# dtrak-ray sweep: {doc['run']}",
        "",
        f"**Best configuration: {best_line(doc)}.**",
        "",
        f"Objective: LDS on {obj.capitalize()} under a held-out lambda. For each test set, a seeded split (seed {sw['split_seed']}) "
        f"puts {sw['selection_fraction']:g} of the {part} in a selection part; lambda is the value of the {len(doc['lambdas'])}-value grid "
        f"with the best mean LDS there (\"selection part\" column), and the LDS is measured at that lambda on the other part "
        f"(\"held-out\", bootstrap mean ± std over subsets). The oracle column picks lambda on the held-out part itself "
        f"(the paper's protocol, optimistic). Projector {doc['projector']}; "
        + ("smaller k are the first k columns of the stored features." if doc["projector"] in PREFIX_PROJECTORS else "each k featurized separately."),
        "",
        sweep_table(doc),
        "",
        (f"Within one bootstrap std of the best: {', '.join(_label(t) for t in close)}: these differences are not resolved."
         if close else "No other configuration is within one bootstrap std of the best."),
        "",
        *_edge_note(doc),
        "![sweep](sweep.png)",
        "",
        f"Feature sets (f/K -> stored k): {', '.join(f'{k} -> {v}' for k, v in doc['feature_sources'].items())}. "
        f"Sweep took {doc['seconds']} s.",
    ]
    return "\n".join(md) + "\n"


def _edge_note(doc: Mapping[str, Any]) -> list[str]:
    """A warning line when a chosen lambda is the smallest or largest of the grid (the optimum may lie beyond it)."""
    obj, lams = doc["sweep"]["objective"], doc["lambdas"]
    edge = [t for t in doc["trials"] if t[f"{obj}_lambda"] in (min(lams), max(lams))]
    if not edge:
        return []
    return [f"Lambda chosen at the edge of the grid ({min(lams):g} or {max(lams):g}) for: {', '.join(_label(t) for t in edge)}; "
            "the best lambda may lie beyond it (widen sweep.lambdas).", ""]


def _label(t: Mapping[str, Any]) -> str:
    return f"{t['method']} K={t['K']} k={t['k']}"


def sweep_figure(doc: Mapping[str, Any]) -> bytes:
    """Left: held-out LDS against k, one line per (method, K). Right: LDS against lambda for the best trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obj = doc["sweep"]["objective"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    lines: dict[tuple[str, int], list[dict]] = {}
    for t in doc["trials"]:
        lines.setdefault((t["method"], t["K"]), []).append(t)
    for (method, K), ts in sorted(lines.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ts = sorted(ts, key=lambda t: t["k"])
        ax1.errorbar([t["k"] for t in ts], [t[f"{obj}_lds"] for t in ts], yerr=[t[f"{obj}_lds_std"] for t in ts],
                     marker="o", capsize=3, label=f"{method} K={K}")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("projection dimension k")
    ax1.set_ylabel(f"held-out {obj.capitalize()} LDS %")
    ax1.set_title("Held-out LDS against k (bootstrap std)")
    ax1.legend(fontsize=8)
    best = doc["trials"][0]
    lams = doc["lambdas"]
    for which, style in (("select", "--"), ("heldout", "-")):
        ys = [np.nan if v is None else v for v in best[f"{obj}_curve_{which}"]]
        ax2.plot(lams, ys, style, marker=".", label=f"{'selection' if which == 'select' else 'held-out'} part")
    ax2.axvline(best[f"{obj}_lambda"], color="gray", lw=0.8)
    ax2.set_xscale("log")
    ax2.set_xlabel("lambda")
    ax2.set_ylabel(f"{obj.capitalize()} LDS %")
    ax2.set_title(f"Best: {best['method']} K={best['K']} k={best['k']}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
