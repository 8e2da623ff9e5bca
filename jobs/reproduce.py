"""Entrypoint for `ray job submit`: the whole reproduction (or some of its stages) on the job's cluster.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python jobs/reproduce.py --config jobs/configs/demo.yaml --store s3://BUCKET/dtrak

A thin face over :func:`dtrak_ray.pipeline.run_pipeline`, like the ``dtrak-ray`` CLI: it joins the
cluster the job runs in (inside a job Ray sets ``RAY_ADDRESS`` to it; elsewhere ``--address`` names one,
or ``local`` starts a local instance), logs each stage as it starts, is reused or finishes, and prints
the LDS table at the end. A resubmitted job resumes: stages (and the models and feature shards inside
them) already done for the same inputs are reused. Bad input exits with code 2 and a message naming
the field; nothing here reads or prints credentials (the store takes them from the environment).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# `python jobs/reproduce.py` puts jobs/ first on sys.path; the package is the working dir's root (Ray
# also puts the job's working dir on PYTHONPATH; this line serves a plain checkout).
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

from dtrak_ray.errors import ConfigError, DtrakError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's arguments (the CLI's ``run`` options, plus ``--stages``)."""
    p = argparse.ArgumentParser(prog="jobs/reproduce.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path, help="experiment config (YAML), e.g. jobs/configs/demo.yaml")
    p.add_argument(
        "--store", required=True,
        help="store URL: s3://bucket/prefix on a cluster (a local path is on the driver's node, and a relative "
        "one lands in the job's temporary working dir)",
    )  # fmt: skip
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)"
    )
    p.add_argument("--stages", default=None, help="comma-separated stages to run (default: all), e.g. featurize,score")
    p.add_argument("--overwrite", action="store_true", help="recompute the stages whose config changed on an existing run")
    p.add_argument(
        "--address", default=None,
        help="Ray address; default: RAY_ADDRESS (set by `ray job submit`), else 'auto'; 'local' starts a local instance",
    )  # fmt: skip
    return p.parse_args(argv)


def chosen_stages(text: str | None) -> list[str] | None:
    """Parse ``--stages``; an unknown name is refused with the list of valid ones."""
    if not text:
        return None
    from dtrak_ray.pipeline import STAGES

    names = [s.strip() for s in text.split(",") if s.strip()]
    valid = [s.name for s in STAGES]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ConfigError(f"--stages: unknown stage(s) {unknown or [text]}; choose from {','.join(valid)}")
    return names


def ray_address(arg: str | None) -> str | None:
    """The cluster to join: ``--address``, else the job's RAY_ADDRESS, else 'auto'; None for 'local'."""
    address = arg or os.environ.get("RAY_ADDRESS") or "auto"
    return None if address == "local" else address


def main(argv: list[str] | None = None) -> int:
    """Run the pipeline; returns the process exit code (0 done, 2 bad input or missing artifacts)."""
    args = parse_args(argv)
    # A job's stdout is a pipe, not a terminal: a fixed width keeps one log line per message.
    console = Console(width=int(os.environ.get("COLUMNS", "160")), log_path=False)
    err = Console(stderr=True, width=console.width)
    t0 = time.perf_counter()
    try:
        from dtrak_ray.config import load_config

        cfg = load_config(args.config, args.overrides)
        stages = chosen_stages(args.stages)
        from dtrak_ray.pipeline import run_pipeline  # late: argument errors need not load torch and Ray

        address = ray_address(args.address)
        console.log(
            f"job: config {args.config} (run {cfg.name!r}), stages {','.join(stages) if stages else 'all'}, Ray at {address or 'a local instance'}"
        )
        try:
            run = run_pipeline(cfg, args.store, stages=stages, overwrite=args.overwrite, address=address, console=console)
        except ConnectionError as exc:  # no cluster at that address: say what to do instead of a traceback
            raise DtrakError(
                f"no Ray cluster at {address!r} ({exc}): submit with `ray job submit`, pass --address HOST:PORT, or --address local"
            ) from exc
    except DtrakError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    if stages is None or "report" in stages:
        from dtrak_ray.cli import results_table

        console.print(results_table(run.read_json(run.SUMMARY)["lds"]))
        console.print(f"report: {run.url(run.REPORT)}", markup=False)
    console.log(f"job: done in {time.perf_counter() - t0:.1f} s; results in {run.url()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
