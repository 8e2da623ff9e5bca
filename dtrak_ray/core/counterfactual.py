"""Counterfactual evaluation math (SPEC.md section 3): which samples to remove, and how far the image moved.

For a generated image, a method's scores tau (N,) rank the training samples; the top-k (largest
scores: the strongest proponents) are removed, a model is retrained from scratch without them, and
the image is regenerated from the same start noise. A larger change means a better attribution.
``random`` removal is the control. Pure functions on arrays: no Ray, no storage.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from dtrak_ray.core.diffusion import mix_seed


def top_k_removal(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, largest first (ties broken by the lower index)."""
    scores = np.asarray(scores)
    if not 1 <= k < scores.shape[0]:
        raise ValueError(f"top-k={k} must be in 1..{scores.shape[0] - 1} (the training set has {scores.shape[0]} samples)")
    return np.argsort(-scores, kind="stable")[:k]


def random_removal(n_train: int, k: int, seed: int, image: int) -> np.ndarray:
    """``k`` distinct training indices drawn with a generator keyed by (seed, image): the random control."""
    if not 1 <= k < n_train:
        raise ValueError(f"top-k={k} must be in 1..{n_train - 1}")
    return np.random.default_rng(mix_seed(seed, image)).choice(n_train, size=k, replace=False)


def pixel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """L2 distance between two images given in [-1, 1], measured on the [0, 1] pixel scale, over all pixels."""
    diff = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) / 2
    return float(np.sqrt((diff**2).sum()))


def summarize(rows: Iterable[dict], methods: Iterable[str]) -> list[dict]:
    """Per method: number of images, mean, median and std of ``l2`` over the rows of that method."""
    rows = list(rows)
    out = []
    for m in methods:
        vals = np.array([r["l2"] for r in rows if r["method"] == m], dtype=np.float64)
        if vals.size:
            out.append({"method": m, "n_images": int(vals.size), "l2_mean": float(vals.mean()),
                        "l2_median": float(np.median(vals)), "l2_std": float(vals.std())})
    return out
