"""The ``dtrak-ray`` command line: ``run`` for every stage in order, and one subcommand per stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dtrak_ray.config import dump_config, load_config
from dtrak_ray.errors import DtrakError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="D-TRAK data attribution for diffusion models, on Ray.")
console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="Experiment config (YAML), e.g. jobs/configs/demo.yaml.")]
StoreOpt = Annotated[str, typer.Option("--store", help="Store URL: a local directory or s3://bucket/prefix.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config field: --set lds.num_subsets=8.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Recompute stages whose config changed on an existing run.")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster address; default: a local instance.")]


def _fail(exc: BaseException) -> None:
    err_console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(code=2)


def results_table(records: list[dict]) -> Table:
    """A rich table of LDS records (the demo's closing print)."""
    table = Table(title="LDS (%), bootstrap mean ± std")
    for col in ("method", "test set", "K", "lambda", "selection", "LDS %"):
        table.add_column(col)
    for r in sorted(records, key=lambda r: (r["test_set"] != "val", r["K"], r["method"], r["lambda_selection"])):
        table.add_row(r["method"], r["test_set"], str(r["K"]), f"{r['lambda']:g}", r["lambda_selection"], f"{r['lds_mean']:.2f} ± {r['lds_std']:.2f}")
    return table


def _run(config: Path, store: str, overrides: list[str] | None, overwrite: bool, address: str | None, stages: list[str] | None) -> None:
    try:
        cfg = load_config(config, overrides or [])
        from dtrak_ray.pipeline import run_pipeline  # imported late: `--help` need not load torch and Ray

        run = run_pipeline(cfg, store, stages=stages, overwrite=overwrite, address=address, console=console)
    except DtrakError as exc:
        _fail(exc)
        return
    if stages is None or "report" in stages:
        summary = run.read_json(run.SUMMARY)
        console.print(results_table(summary["lds"]))
        console.print(f"report: [bold]{run.url(run.REPORT)}[/]")


@app.command()
def run(config: ConfigArg, store: StoreOpt = "./runs", set_: SetOpt = None, overwrite: OverwriteOpt = False, address: AddressOpt = None) -> None:
    """Run every stage in order; stages already done for the same inputs are reused."""
    _run(config, store, set_, overwrite, address, None)


def _stage_command(name: str, help_text: str) -> None:
    def command(config: ConfigArg, store: StoreOpt = "./runs", set_: SetOpt = None, overwrite: OverwriteOpt = False, address: AddressOpt = None) -> None:
        _run(config, store, set_, overwrite, address, [name])

    command.__doc__ = help_text
    app.command(name=name)(command)


for _name, _help in (
    ("data", "Dataset, train/val split and LDS subset masks."),
    ("train", "Train the base model and the LDS subset models."),
    ("generate", "Sample the Gen test set from the base model."),
    ("outputs", "LDS ground truth: L_Simple of every subset model."),
    ("featurize", "Projected per-sample gradients of every split."),
    ("score", "Attribution scores for every lambda."),
    ("evaluate", "LDS with bootstrap; oracle and held-out lambda."),
    ("report", "summary.json, report.md and figures."),
):
    _stage_command(_name, _help)


@app.command("show-config")
def show_config(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the validated config with every field, overrides applied."""
    try:
        console.print(dump_config(load_config(config, set_ or [])), markup=False)
    except DtrakError as exc:
        _fail(exc)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
