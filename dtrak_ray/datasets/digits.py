"""digits-2: two classes of scikit-learn's 8x8 handwritten digits (ship with the package, offline)."""

from __future__ import annotations

import numpy as np

from dtrak_ray.datasets.base import DatasetOptions, ImageDataset
from dtrak_ray.errors import ConfigError


def load_digits_2(classes: tuple[int, int]) -> ImageDataset:
    """The two chosen digit classes of scikit-learn's digits, as 1x8x8 images in [-1, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    keep = np.isin(bunch.target, classes)
    images = (bunch.images[keep].astype(np.float32) / 16.0) * 2.0 - 1.0
    images = images[:, None]
    return ImageDataset(
        f"digits-{classes[0]}{classes[1]}",
        bunch.target[keep].astype(np.int64),
        lambda idx: images[np.asarray(idx, dtype=np.int64)],
        class_names=tuple(str(d) for d in range(10)),
    )


def load(opts: DatasetOptions) -> ImageDataset:
    """Registry entry: digits-2 with ``data.classes`` (two digits)."""
    if opts.image_size not in (None, 8) or opts.center_crop is not None:
        raise ConfigError("digits-2 images are 8x8: leave data.image_size and data.center_crop unset")
    classes = tuple(opts.classes or (3, 8))
    return load_digits_2((int(classes[0]), int(classes[1])))
