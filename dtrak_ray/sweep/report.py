"""The sweep's results as a console line, a table, a markdown report and a figure."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from dtrak_ray.sweep.common import PREFIX_PROJECTORS, TEST_SETS


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
