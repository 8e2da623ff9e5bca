"""Stage ``report``: results/summary.json, a Markdown report with the LDS table, and figures."""

from __future__ import annotations

import io
import time

import numpy as np

from dtrak_ray import __version__
from dtrak_ray.config import dump_config
from dtrak_ray.stages.common import TEST_SETS, Context, load_images
from dtrak_ray.stages.counterfactual import report_sections as counterfactual_sections
from dtrak_ray.stages.groundtruth import report_sections as groundtruth_sections
from dtrak_ray.stages.score import scores_key

SUMMARY_FIELDS = ("method", "f", "test_set", "K", "k", "projector", "noise", "lambda", "lambda_selection", "lds_mean", "lds_std", "stage", "note")


def lds_table(records: list[dict]) -> str:
    """Markdown LDS table: one row per (method, K), one column pair per (test set, lambda protocol)."""
    cols = [(s, sel) for s in TEST_SETS for sel in ("oracle", "held-out")]
    rows: dict[tuple[str, int], dict[tuple[str, str], dict]] = {}
    for r in records:
        rows.setdefault((r["method"], r["K"]), {})[(r["test_set"], r["lambda_selection"])] = r
    head = "| method | K | " + " | ".join(f"{s.capitalize()} LDS % ({sel} lambda)" for s, sel in cols) + " |"
    lines = [head, "|" + "---|" * (2 + len(cols))]
    # D-TRAK/TRAK rows first, then the baselines, then the ensembles (the stage that scored them).
    stage_order = {"score": 0, "baselines": 1, "ensemble": 2}
    first = {}
    for r in records:
        first.setdefault((r["method"], r["K"]), (stage_order.get(r.get("stage", "score"), 3), len(first)))
    for (method, K), cells in sorted(rows.items(), key=lambda kv: (first[kv[0]][0], kv[0][1] or 0, first[kv[0]][1])):
        vals = []
        for c in cols:
            r = cells.get(c)
            lam = "" if r is None else ("no λ" if r["lambda"] is None else f"λ={r['lambda']:g}")
            vals.append("-" if r is None else f"{r['lds_mean']:.2f} ± {r['lds_std']:.2f} ({lam})")
        lines.append(f"| {method} | {'-' if K is None else K} | " + " | ".join(vals) + " |")
    notes = {r["method"]: r["note"] for r in records if r.get("note")}
    if notes:
        lines += ["", *(f"- {method}: {note}" for method, note in notes.items())]
    return "\n".join(lines)


def _show(ax, img: np.ndarray) -> None:  # noqa: ANN001 - a matplotlib Axes
    """One (C, H, W) image in [-1, 1]: RGB when it has 3 channels, else its first channel in gray."""
    if img.shape[0] == 3:
        ax.imshow(np.clip((img.transpose(1, 2, 0) + 1) / 2, 0, 1))
    else:
        ax.imshow(img[0], cmap="gray", vmin=-1, vmax=1)


def _figure(ctx: Context, records: list[dict]) -> bytes:
    """Top-attributed training images under each method, for a few Val and Gen images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = ctx.cfg
    K = max(cfg.features.K)
    methods = [f for f in ("l_simple", "l_square") if f in cfg.features.output_functions] or list(cfg.features.output_functions[:2])
    train = load_images(ctx.run, "train").numpy()
    n_ex, top = cfg.report.n_examples, cfg.report.top
    lam = {(r["f"], r["test_set"]): r["lambda"] for r in records if r["K"] == K and r["lambda_selection"] == "held-out"}
    from dtrak_ray.stages.score import lambdas_of

    lambdas = lambdas_of(ctx)
    n_rows = len(TEST_SETS) * n_ex
    fig, axes = plt.subplots(n_rows, 1 + len(methods) * top, figsize=(1.1 * (1 + len(methods) * top), 1.2 * n_rows), squeeze=False)
    row = 0
    for test_set in TEST_SETS:
        test = load_images(ctx.run, test_set).numpy()
        for i in range(n_ex):
            _show(axes[row, 0], test[i])
            axes[row, 0].set_title(f"{test_set} #{i}", fontsize=7)
            for j, f in enumerate(methods):
                tau = ctx.run.open_array(scores_key(ctx, test_set, f, K))[lambdas.index(lam[(f, test_set)]), i]
                for r, n in enumerate(np.argsort(-tau)[:top]):
                    ax = axes[row, 1 + j * top + r]
                    _show(ax, train[n])
                    if r == 0:
                        ax.set_title({"l_simple": "TRAK", "l_square": "D-TRAK"}.get(f, f), fontsize=7)
            row += 1
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Top-{top} attributed training images (K={K}, held-out lambda)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def run_report(ctx: Context, digest: str) -> None:
    run, cfg = ctx.run, ctx.cfg
    lds_doc = run.read_json(run.LDS)
    records = lds_doc["records"]
    summary = {
        "run": cfg.name,
        "code_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lds": [{k: r.get(k) for k in SUMMARY_FIELDS} | {"lds_point": r["lds_point"], "lambda_folds": r.get("lambda_folds")} for r in records],
    }
    # Ground-truth sections (per-sample LDS plot, seed reliability) and the counterfactual study.
    gt_summary, gt_md = groundtruth_sections(run, cfg, records)
    cf_summary, cf_md = counterfactual_sections(run, cfg)
    summary |= gt_summary | cf_summary
    run.write_json(run.SUMMARY, summary)
    run.write_bytes(run.report_file("top_attributions.png"), _figure(ctx, records))
    md = [
        f"# dtrak-ray report: {cfg.name}",
        "",
        f"Dataset {cfg.data.dataset} (classes {list(cfg.data.classes or ['all'])}), {cfg.lds.num_subsets} LDS subsets "
        f"(alpha = {cfg.lds.alpha}, {cfg.lds.seeds} seed(s) each), projector {cfg.features.projector} k = {cfg.features.k}, "
        f"noise {cfg.features.noise}.",
        "",
        "## LDS (%), bootstrap mean ± std over subsets",
        "",
        "`oracle`: lambda chosen on the evaluation samples themselves (the paper's protocol). "
        "`held-out`: each half of the test samples is scored with the lambda that is best on the other half.",
        "",
        lds_table(records),
        "",
        *(f"Not run: {s['method']}: {s['reason']}\n" for s in lds_doc.get("skipped", [])),
        "## Top-attributed training images",
        "",
        "![top attributions](top_attributions.png)",
        "",
        *gt_md,
        *cf_md,
        "## Config",
        "",
        "```yaml",
        dump_config(cfg).rstrip(),
        "```",
    ]
    run.write_text(run.REPORT, "\n".join(md) + "\n")
