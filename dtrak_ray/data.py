"""Datasets, the train/val split and the LDS subset masks.

"digits-2" is the embedded default: two classes of scikit-learn's handwritten digits (1797 real
8x8 images that ship with the package, so nothing is downloaded), scaled to [-1, 1]. It plays the
part of the paper's CIFAR-2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split


@dataclass(frozen=True)
class ImageDataset:
    """Images (n, C, H, W) float32 in [-1, 1] with integer class labels (n,)."""

    name: str
    images: np.ndarray
    labels: np.ndarray


def load_digits_2(classes: tuple[int, int]) -> ImageDataset:
    """The two chosen digit classes of scikit-learn's digits, as 1x8x8 images in [-1, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    keep = np.isin(bunch.target, classes)
    images = (bunch.images[keep].astype(np.float32) / 16.0) * 2.0 - 1.0
    return ImageDataset(f"digits-{classes[0]}{classes[1]}", images[:, None], bunch.target[keep].astype(np.int64))


def load_dataset(name: str, classes: tuple[int, int]) -> ImageDataset:
    """Load a dataset by its config name."""
    if name == "digits-2":
        return load_digits_2(classes)
    raise ValueError(f"unknown dataset {name!r}: supported: digits-2")


def split_indices(labels: np.ndarray, n_val: int, seed: int, n_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) indices into the dataset, each sorted."""
    if n_val >= len(labels):
        raise ValueError(f"data.n_val={n_val} must be smaller than the dataset ({len(labels)} images)")
    idx = np.arange(len(labels))
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
