"""Datasets, the train/val split and the LDS subset masks.

Datasets are loaded through the registry in :mod:`dtrak_ray.datasets` (digits-2, cifar10, celeba,
artbench, folder). "digits-2" is the embedded default: two classes of scikit-learn's handwritten
digits (1797 real 8x8 images that ship with the package, so nothing is downloaded), scaled to
[-1, 1]. It plays the part of the paper's CIFAR-2.

Where a dataset has an official split (CIFAR-10's test batch, CelebA's partition file, ArtBench's
train/test folders), train images come from the official train pool and Val images from the
official test pool, each drawn stratified by class with the run's seed (SPEC.md section 4);
otherwise both come from one stratified split.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from dtrak_ray.datasets import DatasetOptions, ImageDataset, load
from dtrak_ray.datasets.digits import load_digits_2
from dtrak_ray.errors import ConfigError

__all__ = ["ImageDataset", "load_dataset", "load_digits_2", "split_indices", "subset_masks"]


def load_dataset(
    name: str,
    classes: tuple[int | str, ...] | None = None,
    *,
    path: str | None = None,
    image_size: int | None = None,
    center_crop: int | None = None,
    download: bool = False,
) -> ImageDataset:
    """Load a dataset by its config name (see :mod:`dtrak_ray.datasets`)."""
    return load(name, DatasetOptions(path, None if classes is None else tuple(classes), image_size, center_crop, download))


def _stratified(idx: np.ndarray, labels: np.ndarray, n: int, seed: int, what: str) -> np.ndarray:
    """``n`` of ``idx``, stratified by label; all of them when ``n`` is at least their number."""
    if n >= len(idx):
        return idx
    classes = len(np.unique(labels[idx]))
    if n < classes:
        raise ConfigError(f"{what}={n} is smaller than the number of classes ({classes}): raise it")
    chosen, _ = train_test_split(idx, train_size=n, stratify=labels[idx], random_state=seed)
    return chosen


def split_indices(
    labels: np.ndarray, n_val: int, seed: int, n_train: int | None = None, pool: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) indices into the dataset, each sorted.

    With ``pool`` (0 official train, 1 official test), Val is drawn from pool 1 and train from
    pool 0; without it, from one stratified split of everything.
    """
    idx = np.arange(len(labels))
    if pool is not None:
        train_pool, test_pool = idx[pool == 0], idx[pool == 1]
        if n_val > len(test_pool):
            raise ConfigError(f"data.n_val={n_val} is larger than the official test split ({len(test_pool)} images): lower it")
        if len(train_pool) == 0:
            raise ConfigError("the dataset's official train split is empty: check data.path and data.classes")
        val = _stratified(test_pool, labels, n_val, seed, "data.n_val")
        train = train_pool if n_train is None else _stratified(train_pool, labels, n_train, seed, "data.n_train")
        return np.sort(train), np.sort(val)
    if n_val >= len(labels):
        raise ValueError(f"data.n_val={n_val} must be smaller than the dataset ({len(labels)} images)")
    train, val = train_test_split(idx, test_size=n_val, stratify=labels, random_state=seed)
    if n_train is not None and n_train < len(train):
        train, _ = train_test_split(train, train_size=n_train, stratify=labels[train], random_state=seed)
    return np.sort(train), np.sort(val)


def subset_masks(labels: np.ndarray, num_subsets: int, alpha: float, seed: int) -> np.ndarray:
    """(M, N) boolean masks: each row keeps round(alpha * n_c) samples of every class c, at random."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((num_subsets, len(labels)), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = int(round(alpha * len(members)))
        for m in range(num_subsets):
            masks[m, rng.choice(members, size=take, replace=False)] = True
    return masks
