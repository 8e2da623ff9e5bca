"""The stages in order, their dependencies, and the skip-if-done logic that makes runs resumable.

A stage's digest hashes the config fields it reads and its upstream digests. A stage whose
completion marker carries the same digest is skipped; inner work (each model, each shard) has its
own markers, so a killed run redoes only what was not finished.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

from rich.console import Console

from dtrak_ray.config import ExperimentConfig, config_diff, dump_config, parse_config
from dtrak_ray.distributed.cluster import Resources, available_workers, connect, require_fit
from dtrak_ray.errors import MissingArtifactError, RunConflictError
from dtrak_ray.stages.baselines import run_baselines
from dtrak_ray.stages.common import Context, Stage
from dtrak_ray.stages.counterfactual import run_counterfactual
from dtrak_ray.stages.data import run_data
from dtrak_ray.stages.ensemble import run_ensemble
from dtrak_ray.stages.featurize import run_featurize
from dtrak_ray.stages.groundtruth import run_outputs
from dtrak_ray.stages.report import run_report
from dtrak_ray.stages.score import run_evaluate, run_score
from dtrak_ray.stages.train import run_generate, run_train
from dtrak_ray.storage import RunStore, Store

STAGES: tuple[Stage, ...] = (
    Stage("data", ("seed", "data", "lds.num_subsets", "lds.alpha"), (), run_data, "Dataset, train/val split, LDS subset masks."),
    Stage("train", ("model", "diffusion", "train", "lds.seeds"), ("data",), run_train, "Base model and LDS subset models."),
    Stage("generate", ("generate",), ("train",), run_generate, "The Gen test set, sampled with DDIM."),
    Stage("outputs", ("lds.output_timesteps", "lds.noise_seeds"), ("train", "generate"), run_outputs, "LDS ground truth."),
    Stage("featurize", ("features",), ("train", "generate"), run_featurize, "Projected per-sample gradients."),
    Stage("score", ("scoring",), ("featurize",), run_score, "Attribution scores for every lambda."),
    Stage("baselines", ("baselines",), ("featurize", "score", "outputs"), run_baselines, "The paper's baselines, scored like D-TRAK."),
    Stage("ensemble", ("ensemble",), ("featurize", "score"), run_ensemble, "D-TRAK averaged over models trained on random halves."),
    Stage("evaluate", ("lds.bootstrap_resamples", "scoring.heldout_seed"), ("score", "outputs", "baselines", "ensemble"), run_evaluate,
          "LDS of every method and lambda selection."),
    Stage("counterfactual", ("counterfactual",), ("evaluate",), run_counterfactual, "Remove top-k, retrain, regenerate."),
    Stage("report", ("report",), ("evaluate", "counterfactual"), run_report, "summary.json, report.md and figures."),
)
BY_NAME = {s.name: s for s in STAGES}


def stage_digests(cfg: ExperimentConfig) -> dict[str, str]:
    """Digest of every stage: its config fields plus its upstream digests."""
    out: dict[str, str] = {}
    for stage in STAGES:
        text = cfg.section_digest(*stage.sections) + "".join(out[d] for d in stage.deps)
        out[stage.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def _marker(stage: str) -> str:
    return f"stages/{stage}"


def claim_run(run: RunStore, cfg: ExperimentConfig, overwrite: bool) -> None:
    """Record the config of a new run; refuse a different config on an existing one."""
    if run.exists(run.CONFIG):
        import yaml

        old = parse_config(yaml.safe_load(run.read_text(run.CONFIG)), source=run.url(run.CONFIG))
        diff = config_diff(old, cfg)
        if diff and not overwrite:
            raise RunConflictError(
                f"run {cfg.name!r} in {run.store.url} was made with a different config ({', '.join(diff[:6])}"
                f"{' ...' if len(diff) > 6 else ''} differ): choose another name with --set name=NEW, "
                "or pass --overwrite to recompute the stages those fields affect"
            )
    run.write_text(run.CONFIG, dump_config(cfg))


def resources_of(cfg: ExperimentConfig) -> Resources:
    r = cfg.resources
    require_fit(r.cpus_per_worker, r.gpus_per_worker)
    workers = r.num_workers or available_workers(r.cpus_per_worker, r.gpus_per_worker)
    return Resources(workers=workers, cpus=r.cpus_per_worker, gpus=r.gpus_per_worker, torch_threads=r.torch_threads)


def run_pipeline(
    cfg: ExperimentConfig,
    store_url: str,
    stages: Sequence[str] | None = None,
    overwrite: bool = False,
    address: str | None = None,
    console: Console | None = None,
) -> RunStore:
    """Run the named stages (all by default) in order; returns the run's store."""
    console = console or Console()
    run = Store(store_url).run(cfg.name)
    claim_run(run, cfg, overwrite)
    connect(address, cfg.resources.num_workers)
    digests = stage_digests(cfg)
    ctx = Context(cfg=cfg, run=run, resources=resources_of(cfg), console=console, digests=digests)
    chosen = list(stages) if stages else [s.name for s in STAGES]
    console.print(f"[bold]run[/] {cfg.name} -> {run.url()}  ({ctx.resources.workers} workers)")
    for stage in STAGES:
        if stage.name not in chosen:
            continue
        missing = [d for d in stage.deps if not run.done(_marker(d), digests[d])]
        if missing:
            raise MissingArtifactError(
                f"stage {stage.name!r} needs stage(s) {missing} of run {cfg.name!r} first: run them, or `dtrak-ray run`"
            )
        if run.done(_marker(stage.name), digests[stage.name]):
            console.print(f"[dim]- {stage.name}: done earlier, reused[/]")
            continue
        console.print(f"[bold cyan]- {stage.name}[/]: {stage.help}")
        t0 = time.perf_counter()
        stage.body(ctx, digests[stage.name])
        run.mark_done(_marker(stage.name), digest=digests[stage.name], seconds=time.perf_counter() - t0)
        console.print(f"  {stage.name} finished in {time.perf_counter() - t0:.1f} s")
    return run
