"""Stage ``data``: the dataset, the train/val split and the LDS subset masks, into the store.

Only the chosen train and Val images are decoded (a CelebA run reads 6000 JPEGs, not 200k). The
class names, and for ArtBench the captions "a {style} painting", go into the attributes of
``data/indices.zarr`` so later stages (and the Stable Diffusion model kind) can read them.
"""

from __future__ import annotations

import numpy as np

from dtrak_ray.data import load_dataset, split_indices, subset_masks
from dtrak_ray.stages.common import Context, provenance


def run_data(ctx: Context, digest: str) -> None:
    cfg = ctx.cfg
    d = cfg.data
    ds = load_dataset(d.dataset, d.classes, path=d.path, image_size=d.image_size, center_crop=d.center_crop, download=d.download)
    train, val = split_indices(ds.labels, d.n_val, cfg.seed, d.n_train, ds.pool)
    images = ds.read(np.concatenate([train, val]))
    masks = subset_masks(ds.labels[train], cfg.lds.num_subsets, cfg.lds.alpha, cfg.seed)
    attrs = provenance(
        cfg, classes=None if d.classes is None else list(d.classes), class_names=list(ds.class_names), split_seed=cfg.seed,
        alpha=cfg.lds.alpha, official_split=ds.pool is not None, image_size=d.image_size, center_crop=d.center_crop,
        captions=ds.meta.get("captions"),
    )
    ctx.run.write_group(
        ctx.run.INDICES,
        {
            "train": train,
            "val": val,
            "train_labels": ds.labels[train],
            "val_labels": ds.labels[val],
            "train_images": images[: len(train)],
            "val_images": images[len(train) :],
            "masks": masks,
        },
        attrs,
    )
    ctx.log(f"  {ds.name}: {len(train)} train, {len(val)} val, {masks.shape[0]} subsets of {int(masks[0].sum())}")


def read_masks(ctx: Context) -> np.ndarray:
    return ctx.run.read_array(f"{ctx.run.INDICES}/masks")
