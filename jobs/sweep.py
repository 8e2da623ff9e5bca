"""Entrypoint for `ray job submit`: the Ray Tune sweep (k, K, output function, lambda) on a finished run.

    ray job submit --working-dir . -- \\
        python jobs/sweep.py --config jobs/configs/demo.yaml --store s3://BUCKET/dtrak --set sweep.k=[512,4096]

The run must exist in the store (``jobs/reproduce.py`` or ``dtrak-ray run`` made it); the sweep reuses
its ground truth and features, computes the feature sets it lacks (kept for the next sweep), runs one
Tune trial per (f, K, k) and writes ``results/sweep.json``, ``report/sweep.md`` and ``report/sweep.png``.
It joins the job's cluster (``RAY_ADDRESS``), or ``--address``; ``local`` starts a local instance.
Bad input exits with code 2 and a message naming the field.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# `python jobs/sweep.py` puts jobs/ first on sys.path; the package is the working dir's root.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

from dtrak_ray.errors import DtrakError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's arguments (those of ``dtrak-ray sweep``)."""
    p = argparse.ArgumentParser(prog="jobs/sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path, help="the run's experiment config (YAML), e.g. jobs/configs/demo.yaml")
    p.add_argument("--store", required=True, help="store URL holding the run: s3://bucket/prefix on a cluster")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. sweep.k=[512,4096] (only sweep.* and resources.* may differ from the run)")
    p.add_argument("--address", default=None, help="Ray address; default: RAY_ADDRESS (set by `ray job submit`), else 'auto'; 'local' starts one")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns the exit code (0 done, 2 bad input, missing run or failed trials)."""
    args = parse_args(argv)
    console = Console(width=int(os.environ.get("COLUMNS", "160")), log_path=False)  # a job's stdout is a pipe
    err = Console(stderr=True, width=console.width)
    t0 = time.perf_counter()
    try:
        from dtrak_ray.config import load_config

        cfg = load_config(args.config, args.overrides)
        from dtrak_ray.sweep import best_line, run_sweep  # late: argument errors need not load torch and Ray

        address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
        address = None if address == "local" else address
        console.log(f"sweep job: run {cfg.name!r} in {args.store}, Ray at {address or 'a local instance'}")
        try:
            doc = run_sweep(cfg, args.store, address=address, console=console)
        except ConnectionError as exc:
            raise DtrakError(f"no Ray cluster at {address!r} ({exc}): submit with `ray job submit`, or pass --address local") from exc
    except DtrakError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    from dtrak_ray.cli import sweep_results_table

    console.print(sweep_results_table(doc))
    console.print(f"best: {best_line(doc)}", markup=False)
    console.log(f"sweep job: done in {time.perf_counter() - t0:.1f} s; report {doc['urls']['md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
