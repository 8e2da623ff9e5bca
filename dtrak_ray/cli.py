"""The ``dtrak-ray`` command line: ``run`` for every stage in order, and one subcommand per stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
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
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Start without asking for confirmation after the cost estimate.")]
PaperOpt = Annotated[bool, typer.Option("--paper/--no-paper", help="Also estimate the paper's CIFAR-2 ground truth on this device.")]


def _fail(exc: BaseException) -> None:
    # An error raised inside a Ray task or actor arrives wrapped, with the remote traceback in its
    # text: show the user the original message only. escape(): messages hold brackets, not markup.
    cause = getattr(exc, "cause", None)
    if isinstance(cause, DtrakError):
        exc = cause
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
    raise typer.Exit(code=2)


def results_table(records: list[dict]) -> Table:
    """A rich table of LDS records (the demo's closing print)."""
    table = Table(title="LDS (%), bootstrap mean ± std")
    for col in ("method", "test set", "K", "lambda", "selection", "LDS %"):
        table.add_column(col)
    # Baselines and ensembles (stage "baselines"/"ensemble") after TRAK/D-TRAK; a method without K or lambda shows "-".
    order = {"score": 0, "baselines": 1, "ensemble": 2}
    for r in sorted(records, key=lambda r: (r["test_set"] != "val", order.get(r.get("stage", "score"), 3), r["K"] or 0, r["method"], r["lambda_selection"])):
        lam = "-" if r["lambda"] is None else f"{r['lambda']:g}"
        table.add_row(r["method"], r["test_set"], str(r["K"] or "-"), lam, r["lambda_selection"], f"{r['lds_mean']:.2f} ± {r['lds_std']:.2f}")
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
        if summary.get("counterfactual"):
            console.print(counterfactual_results_table(summary["counterfactual"]))
        console.print(f"report: [bold]{run.url(run.REPORT)}[/]")


def counterfactual_results_table(cf: dict) -> Table:
    """A rich table of the counterfactual study: pixel L2 change per method."""
    table = Table(title=f"Counterfactual: pixel L2 change after removing the top {cf['top_k']} (K={cf['K']}), {cf['n_images']} images")
    for col in ("method", "mean L2", "median L2"):
        table.add_column(col)
    for m in cf["methods"]:
        table.add_row(m["method"], f"{m['l2_mean']:.3f}", f"{m['l2_median']:.3f}")
    return table


@app.command()
def run(
    config: ConfigArg, store: StoreOpt = "./runs", set_: SetOpt = None, overwrite: OverwriteOpt = False, address: AddressOpt = None,
    yes: YesOpt = False, paper: PaperOpt = True,
) -> None:
    """Run every stage in order; stages already done for the same inputs are reused.

    First prints the measured cost estimate of the ground truth and asks to go on (unless --yes)."""
    _confirm_cost(config, set_, yes, paper)
    _run(config, store, set_, overwrite, address, None)


def _print_estimate(config: Path, overrides: list[str] | None, paper: bool) -> None:
    cfg = load_config(config, overrides or [])
    from dtrak_ray.cost import cost_table, estimate_config  # imported late: torch

    console.print("[dim]measuring a few training steps and forward passes for the cost estimate ...[/]")
    console.print(cost_table(estimate_config(cfg, paper=paper)))


def _confirm_cost(config: Path, overrides: list[str] | None, yes: bool, paper: bool) -> None:
    """Print the cost estimate; go on with --yes or an interactive yes, refuse on a non-interactive stdin."""
    try:
        _print_estimate(config, overrides, paper)
        if yes:
            return
        if not sys.stdin.isatty():
            raise DtrakError("not starting: stdin is not a terminal, so the cost above cannot be confirmed; pass --yes to start anyway")
    except DtrakError as exc:
        _fail(exc)
    if not typer.confirm("Start the run?", default=False):
        err_console.print("aborted: nothing was started")
        raise typer.Exit(code=1)


@app.command()
def estimate(config: ConfigArg, set_: SetOpt = None, paper: PaperOpt = True) -> None:
    """Estimate models, steps and device-hours of the LDS ground truth from a short measured run."""
    try:
        _print_estimate(config, set_, paper)
    except DtrakError as exc:
        _fail(exc)


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
    ("baselines", "The paper's baselines (raw pixels, gradients, TracIn, GAS, IFs, Journey-TRAK, datamodels)."),
    ("ensemble", "D-TRAK averaged over models trained on random halves."),
    ("evaluate", "LDS with bootstrap; oracle and held-out lambda."),
    ("counterfactual", "Remove each image's top-k attributed samples, retrain, regenerate."),
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


@app.command()
def sweep(config: ConfigArg, store: StoreOpt = "./runs", set_: SetOpt = None, address: AddressOpt = None) -> None:
    """Ray Tune sweep over k, K, output function and lambda (held-out LDS) on a finished run; see the sweep section."""
    try:
        cfg = load_config(config, set_ or [])
        from dtrak_ray.sweep import best_line, run_sweep  # imported late: `--help` need not load torch and Ray

        doc = run_sweep(cfg, store, address=address, console=console)
    except DtrakError as exc:
        _fail(exc)
        return
    console.print(sweep_results_table(doc))
    console.print(f"best: [bold]{best_line(doc)}[/]")
    console.print("report: " + ", ".join(f"[bold]{doc['urls'][k]}[/]" for k in ("md", "png", "json")))


def sweep_results_table(doc: dict) -> Table:
    """A rich table of a sweep's trials (``results/sweep.json``), best first."""
    obj = doc["sweep"]["objective"]
    table = Table(title=f"Sweep: {obj.capitalize()} LDS (%), lambda chosen on the selection part, best first")
    for col in ("method", "K", "k", "lambda", "selection part", "held-out part", "held-out, oracle lambda"):
        table.add_column(col)
    for t in doc["trials"]:
        table.add_row(t["method"], str(t["K"]), str(t["k"]), f"{t[f'{obj}_lambda']:g}", f"{t[f'{obj}_lds_select']:.2f}",
                      f"{t[f'{obj}_lds']:.2f} ± {t[f'{obj}_lds_std']:.2f}", f"{t[f'{obj}_lds_oracle']:.2f}")
    return table


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
