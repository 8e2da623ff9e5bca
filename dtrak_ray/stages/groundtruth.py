"""Stage ``outputs``: the LDS ground truth, L_Simple of every subset model on the Val and Gen sets.

Array ``lds/outputs-{set}.zarr`` has shape (M, seeds, noise seeds, n_test); each model's task writes
its own chunk, so tasks never write the same chunk and a rerun does only the missing models.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from scipy.stats import rankdata

from dtrak_ray.config import ExperimentConfig
from dtrak_ray.core.diffusion import timestep_grid
from dtrak_ray.core.groundtruth import l_simple_outputs
from dtrak_ray.distributed.pool import map_tasks
from dtrak_ray.stages.common import TEST_SETS, Context, device_of, load_images, load_model, provenance, scheduler_of
from dtrak_ray.stages.train import ModelJob
from dtrak_ray.storage import RunStore


def _marker(job: ModelJob) -> str:
    return f"lds/outputs/subset-{job.subset:03d}-seed-{job.seed}"


def _evaluate_one(job: ModelJob, run: RunStore, cfg: ExperimentConfig, digest: str) -> None:
    if run.done(_marker(job), digest):
        return
    grid = timestep_grid(cfg.lds.output_timesteps, cfg.diffusion.num_train_timesteps)
    if cfg.model.kind == "sd-lora":  # Stable Diffusion + LoRA: latents, one caption per image (stages/sd_lora.py)
        from dtrak_ray.stages import sd_lora

        for test_set, out in sd_lora.ground_truth(run, cfg, job.key(run), TEST_SETS, grid).items():
            run.open_array(run.outputs(test_set), mode="r+")[job.subset, job.seed] = out
        run.mark_done(_marker(job), digest=digest)
        return
    model, _ = load_model(run, job.key(run))
    model.to(device_of(cfg))
    sched = scheduler_of(cfg)
    for test_set in TEST_SETS:
        x = load_images(run, test_set)
        idx = list(range(x.shape[0]))
        out = np.stack([l_simple_outputs(model, sched, x, idx, grid, 10_000 + ns).numpy() for ns in range(cfg.lds.noise_seeds)])
        run.open_array(run.outputs(test_set), mode="r+")[job.subset, job.seed] = out
    run.mark_done(_marker(job), digest=digest)


def run_outputs(ctx: Context, digest: str) -> None:
    cfg, run = ctx.cfg, ctx.run
    lds = cfg.lds
    for test_set in TEST_SETS:
        key = run.outputs(test_set)
        n = load_images(run, test_set).shape[0]
        fresh = not run.exists(key) or run.open_array(key).attrs.get("digest") != digest
        if fresh:
            attrs = provenance(cfg, digest=digest, output_function="l_simple", timesteps=lds.output_timesteps, noise_seeds=lds.noise_seeds, test_set=test_set)
            run.create_array(key, (lds.num_subsets, lds.seeds, lds.noise_seeds, n), (1, 1, lds.noise_seeds, n), "float32", attrs)
    jobs = [ModelJob(m, s) for m in range(lds.num_subsets) for s in range(lds.seeds)]
    todo = [j for j in jobs if not run.done(_marker(j), digest)]
    map_tasks(partial(_evaluate_one, run=run, cfg=cfg, digest=digest), todo, ctx.resources, "ground truth", unit="models")


def read_outputs(run: RunStore, test_set: str) -> np.ndarray:
    """(M, n_test): outputs averaged over training seeds and noise seeds, as in SPEC.md."""
    return run.read_array(run.outputs(test_set)).mean(axis=(1, 2))


def seed_reliability(raw: np.ndarray) -> dict | None:
    """How well one training seed's outputs predict another's: the ceiling on any method's LDS.

    ``raw`` (M, seeds, noise seeds, n_test) as stored. Outputs are averaged over noise seeds; for each
    pair of seeds and each test sample, the Spearman rank correlation across the M subsets between
    the two seeds' outputs; then the mean over test samples, and over pairs. None with one seed.
    """
    per_seed = raw.mean(axis=2)  # (M, S, n)
    S = per_seed.shape[1]
    if S < 2:
        return None
    ranks = rankdata(per_seed, axis=0)  # Spearman = Pearson on ranks, per (seed, sample) column
    pairs = {}
    for a in range(S):
        for b in range(a + 1, S):
            ra = ranks[:, a] - ranks[:, a].mean(0)
            rb = ranks[:, b] - ranks[:, b].mean(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                rho = (ra * rb).sum(0) / np.sqrt((ra**2).sum(0) * (rb**2).sum(0))
            pairs[f"{a}-{b}"] = float(np.nanmean(rho))
    return {"mean": float(np.mean(list(pairs.values()))), "pairs": pairs, "num_subsets": int(raw.shape[0]), "seeds": S}


def _per_sample_figure(records: list[dict]) -> bytes:
    """Box plots (with every sample as a dot) of per-sample LDS for each (method, K), one panel per test set."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[list[str], list[np.ndarray]]] = []
    for test_set in TEST_SETS:
        groups: dict[str, dict] = {}
        for r in records:
            if r.get("test_set") != test_set or not r.get("per_sample_lds"):
                continue
            label = f"{r['method']} K={r['K']}" if r.get("K") is not None else str(r["method"])
            # The held-out lambda protocol where a record has one; otherwise the only record there is.
            if label not in groups or r.get("lambda_selection") == "held-out":
                groups[label] = r
        labels = sorted(groups, key=lambda lab: (groups[lab].get("K") or 0, lab), reverse=True)
        panels.append((labels, [np.array([v for v in groups[lab]["per_sample_lds"] if v is not None]) * 100 for lab in labels]))
    n_rows = max([len(labels) for labels, _ in panels] + [1])
    # Horizontal boxes: one row per (method, K), so long method names stay readable.
    fig, axes = plt.subplots(1, len(TEST_SETS), figsize=(5.5 * len(TEST_SETS), 1.0 + 0.32 * n_rows), squeeze=False, sharex=True)
    jitter = np.random.default_rng(0)
    for ax, test_set, (labels, data) in zip(axes[0], TEST_SETS, panels, strict=True):
        if data:
            ax.boxplot(data, vert=False, showfliers=False)
            for i, d in enumerate(data, start=1):
                ax.scatter(d, i + jitter.uniform(-0.15, 0.15, d.size), s=4, alpha=0.5, color="tab:blue")
            ax.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
        ax.axvline(0, color="gray", lw=0.5)
        ax.set_title(f"{test_set.capitalize()}: per-sample LDS (held-out lambda)", fontsize=9)
        ax.set_xlabel("LDS % (Spearman across subsets)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def report_sections(run: RunStore, cfg: ExperimentConfig, records: list[dict]) -> tuple[dict, list[str]]:
    """Report material on the ground truth: the per-sample LDS plot (written to the store), the seed
    reliability; returns (entries for summary.json, Markdown lines)."""
    run.write_bytes(run.report_file("per_sample_lds.png"), _per_sample_figure(records))
    reliability = {s: seed_reliability(run.read_array(run.outputs(s))) for s in TEST_SETS}
    md = ["## Per-sample LDS", "",
          "Distribution over test samples of the Spearman correlation between predicted and actual outputs "
          "(held-out lambda); the table above gives their mean.", "", "![per-sample LDS](per_sample_lds.png)", "",
          "## Reliability of the ground truth", ""]
    if cfg.lds.seeds < 2:
        md.append(f"lds.seeds = {cfg.lds.seeds}: with one training seed per subset the reliability cannot be measured "
                  "(set lds.seeds >= 2).")
        summary: dict = {"seed_reliability": None}
    else:
        md += ["Spearman rank correlation across subsets between the outputs of two training seeds of the same subsets, "
               "per test sample, averaged over samples (and seed pairs): how well one seed's ground truth predicts "
               "another's, a ceiling on any single-seed LDS. The stored ground truth averages all seeds.", "",
               "| test set | seeds | rank correlation (mean over pairs) | per pair |", "|---|---|---|---|"]
        for s, rel in reliability.items():
            pairs = ", ".join(f"{p}: {v:.3f}" for p, v in rel["pairs"].items())
            md.append(f"| {s} | {rel['seeds']} | {rel['mean']:.3f} | {pairs} |")
        summary = {"seed_reliability": {s: rel["mean"] for s, rel in reliability.items()},
                   "seed_reliability_pairs": {s: rel["pairs"] for s, rel in reliability.items()}}
    return summary, md + [""]
