"""The sweep on a finished run: check the run, ensure the features, run the Tune grid, write the results."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from rich.console import Console

from dtrak_ray import __version__
from dtrak_ray.config import ExperimentConfig, config_diff, parse_config
from dtrak_ray.core.kernel import lambda_grid
from dtrak_ray.errors import ConfigError, MissingArtifactError, RunConflictError
from dtrak_ray.storage import RunStore, Store
from dtrak_ray.sweep.common import TEST_SETS
from dtrak_ray.sweep.features import _stage_marker, ensure_features
from dtrak_ray.sweep.objective import heldout_split
from dtrak_ray.sweep.report import sweep_figure, sweep_markdown
from dtrak_ray.sweep.trial import TrialInputs, run_trial

# Stages whose outputs the sweep reads (featurize: reused when done), and the other config fields it uses.
_NEEDED_STAGES = ("data", "train", "generate", "outputs")
_READ_STAGES = (*_NEEDED_STAGES, "featurize")
_READ_FIELDS = ("seed", "lds", "scoring")


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
