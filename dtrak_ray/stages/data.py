"""Stage ``data``: the dataset, the train/val split and the LDS subset masks, into the store."""

from __future__ import annotations

import numpy as np

from dtrak_ray.data import load_dataset, split_indices, subset_masks
from dtrak_ray.stages.common import Context, provenance


def run_data(ctx: Context, digest: str) -> None:
    cfg = ctx.cfg
    ds = load_dataset(cfg.data.dataset, cfg.data.classes)
    train, val = split_indices(ds.labels, cfg.data.n_val, cfg.seed, cfg.data.n_train)
    masks = subset_masks(ds.labels[train], cfg.lds.num_subsets, cfg.lds.alpha, cfg.seed)
    attrs = provenance(cfg, classes=list(cfg.data.classes), split_seed=cfg.seed, alpha=cfg.lds.alpha)
    ctx.run.write_group(
        ctx.run.INDICES,
        {
            "train": train,
            "val": val,
            "train_labels": ds.labels[train],
            "val_labels": ds.labels[val],
            "train_images": ds.images[train],
            "val_images": ds.images[val],
            "masks": masks,
        },
        attrs,
    )
    ctx.log(f"  {ds.name}: {len(train)} train, {len(val)} val, {masks.shape[0]} subsets of {int(masks[0].sum())}")


def read_masks(ctx: Context) -> np.ndarray:
    return ctx.run.read_array(f"{ctx.run.INDICES}/masks")
