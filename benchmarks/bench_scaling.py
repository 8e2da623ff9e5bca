"""Featurization throughput of the real featurize stage with 1 and 2 Ray workers, same run.

    .venv/bin/python -m benchmarks.bench_scaling [--K 10 100] [--store DIR] [--address ADDR] [--set KEY=VALUE ...]

One run is prepared in a store (a temporary local one by default): the data stage, a base model
(freshly initialised with the config's seed: throughput does not depend on training, and training
the demo takes minutes) and the Gen set sampled from it by the generate stage. Then the featurize
stage (``run_featurize``: Featurizer actors, shards, Zarr writes and completion markers) runs on
the whole run (train, val and gen; every output function and timestep count of the config, or
those of ``--K``) once per worker layout, each under a fresh digest so nothing is reused:

    1 worker  x 1 torch thread
    2 workers x 1 torch thread     (the scaling: ratio to the line above)
    1 worker  x 2 torch threads    (the same two CPUs as one process; the issue saw ~40% less)

Throughput is rows per second of wall time, actor start-up, projector generation and storage
writes included: what a user of the stage sees. Each layout starts its own actors (a process,
imports, the model, a 1.4 GB Gaussian matrix: a few seconds), which weighs on a short job: with the
demo's K = 10 and 100 the 2-worker ratio measured here was 1.69x, with ``--K 10`` alone 1.3-1.4x.
The features of every layout are compared with
the first layout's (the featurizer is meant to be bit-identical whatever the worker count).

It uses what the cluster has: a local Ray instance with this machine's CPUs unless ``--address``
(or RAY_ADDRESS) names a cluster; where the cluster has GPUs each worker asks for its share
(``resources.gpus_per_worker``), so a GPU-aware featurizer runs on them. A layout that does not fit
is skipped with a message. The last line prints the 2-worker / 1-worker ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import ray
from rich.console import Console

from benchmarks._machine import load_note
from dtrak_ray.config import load_config
from dtrak_ray.distributed.cluster import Resources, connect, shutdown
from dtrak_ray.stages.common import Context, load_images, new_model, save_model
from dtrak_ray.stages.data import run_data
from dtrak_ray.stages.featurize import SPLITS, features_key, run_featurize, stored_dim
from dtrak_ray.stages.train import run_generate
from dtrak_ray.storage import Store


@dataclass(frozen=True)
class Layout:
    name: str
    workers: int
    threads: int


LAYOUTS = (Layout("1 worker  x 1 thread ", 1, 1), Layout("2 workers x 1 thread ", 2, 1), Layout("1 worker  x 2 threads", 1, 2))


def _resources(layout: Layout, cluster: dict[str, float]) -> Resources | str:
    """Ray resources of a layout on this cluster, or why it does not fit."""
    cpus = float(layout.threads)
    if cluster.get("CPU", 0) < layout.workers * cpus:
        return f"needs {layout.workers * cpus:g} CPUs, the cluster has {cluster.get('CPU', 0):g}"
    # GPUs where there are some: each worker takes an equal share (Ray allows fractions).
    gpus = min(1.0, cluster.get("GPU", 0.0) / layout.workers)
    return Resources(workers=layout.workers, cpus=cpus, gpus=gpus, torch_threads=layout.threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="jobs/configs/demo.yaml")
    ap.add_argument("--K", type=int, nargs="+", default=None, help="timestep counts (one pass for all); default: the config's")
    ap.add_argument("--store", default=None, help="store URL (local path or s3://); default: a temporary directory")
    ap.add_argument("--address", default=None, help="Ray cluster address; default: a local instance (or RAY_ADDRESS)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    console = Console(soft_wrap=True)  # result lines unbroken when the output is not a terminal
    console.print(load_note())  # before any work of ours adds to it
    overrides = ["name=bench-scaling", *([f"features.K={list(args.K)}"] if args.K else []), *args.overrides]
    cfg = load_config(args.config, overrides)

    with tempfile.TemporaryDirectory() as tmp:
        run = Store(args.store or tmp).run(cfg.name)
        connect(args.address)
        cluster = ray.cluster_resources()
        console.print(f"cluster: {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs")

        # ---- one run, prepared once -----------------------------------------------------------
        t0 = time.perf_counter()
        prep = Context(cfg=cfg, run=run, resources=Resources(workers=1), console=console)
        run_data(prep, "bench")
        save_model(run, run.base_model(0), new_model(cfg, cfg.seed))
        run_generate(prep, "bench")
        rows = sum(load_images(run, s).shape[0] for s in SPLITS) * len(cfg.features.output_functions)
        k = stored_dim(cfg)
        sizes = ", ".join(f"{s} {load_images(run, s).shape[0]}" for s in SPLITS)
        console.print(
            f"run prepared in {time.perf_counter() - t0:.1f} s: {sizes} images x {len(cfg.features.output_functions)} output "
            f"functions = {rows} rows per featurization; K={list(cfg.features.K)}, {cfg.features.projector} k={k}, "
            f"shards of {cfg.features.shard_size}"
        )

        # ---- the same featurization under each layout -----------------------------------------
        rates: dict[str, float] = {}
        first: dict[str, np.ndarray] | None = None
        for i, layout in enumerate(LAYOUTS):
            res = _resources(layout, cluster)
            if isinstance(res, str):
                console.print(f"[yellow]{layout.name}: skipped, {res}[/]")
                continue
            lcfg = load_config(
                args.config,
                overrides
                + [
                    f"resources.num_workers={res.workers}",
                    f"resources.cpus_per_worker={res.cpus}",
                    f"resources.gpus_per_worker={res.gpus}",
                    f"resources.torch_threads={res.torch_threads}",
                ],
            )
            ctx = Context(cfg=lcfg, run=run, resources=res, console=console)
            t0 = time.perf_counter()
            run_featurize(ctx, f"bench-scaling-{i}")  # a fresh digest: every shard is recomputed
            dt = time.perf_counter() - t0
            rates[layout.name] = rows / dt
            feats = {
                f"{s}/{f}/K{K}": run.open_array(features_key(run, lcfg, s, f, K, k))[...]
                for s in SPLITS
                for f in lcfg.features.output_functions
                for K in lcfg.features.K
            }
            if first is None:
                first, same = feats, "reference"
            else:
                diff = max(float(np.abs(feats[n] - first[n]).max() / np.abs(first[n]).max()) for n in feats)
                same = (
                    "bit-identical to the first layout"
                    if diff == 0
                    else f"max relative difference to the first layout {diff:.1e}"
                )
            console.print(f"{layout.name}: {rows / dt:7.1f} rows/s ({dt:.1f} s; features {same})")
        shutdown()

    one, two, threads = (rates.get(layout.name) for layout in LAYOUTS)
    if two and threads:
        console.print(f"2 workers x 1 thread / 1 worker x 2 threads: {two / threads:.2f}x (the issue noted ~1.4x on 2 cores)")
    if one and two:
        console.print(f"scaling, 2 workers / 1 worker (rows/s): {two / one:.2f}x (ideal 2.00x)")
    else:
        console.print("scaling, 2 workers / 1 worker: not measured (the 2-worker layout did not fit this cluster)")


if __name__ == "__main__":
    main()
