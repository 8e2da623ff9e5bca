"""Dataset loaders, by config name (``data.dataset``).

| name | loader | data needed at ``data.path`` |
|---|---|---|
| digits-2 | :mod:`.digits` | nothing (ships with scikit-learn) |
| cifar10 | :mod:`.cifar` | the official python pickles (``cifar-10-batches-py/``); ``data.download`` fetches them |
| celeba | :mod:`.celeba` | ``img_align_celeba/*.jpg`` and ``list_eval_partition.txt`` |
| artbench | :mod:`.artbench` | ``train/{style}/``, ``test/{style}/`` (the 256 px ImageFolder split) |
| folder | :mod:`.folder` | one subfolder of images per class (optionally under train/ and test/) |

Every loader takes :class:`DatasetOptions` and returns an :class:`ImageDataset` whose images are
decoded on demand. Loader modules are imported when a dataset is loaded, not at import time, so
the config can check names against :data:`NATIVE_SIZE` cheaply.
"""

from __future__ import annotations

import importlib

from dtrak_ray.datasets.base import DatasetOptions, ImageDataset

# name -> (module, native image size, channels); the size is what the images are without data.image_size.
REGISTRY: dict[str, tuple[str, int | None, int]] = {
    "digits-2": ("dtrak_ray.datasets.digits", 8, 1),
    "cifar10": ("dtrak_ray.datasets.cifar", 32, 3),
    "celeba": ("dtrak_ray.datasets.celeba", None, 3),
    "artbench": ("dtrak_ray.datasets.artbench", 256, 3),
    "folder": ("dtrak_ray.datasets.folder", None, 3),
}
DATASET_NAMES = tuple(REGISTRY)


def image_shape(name: str, image_size: int | None, center_crop: int | None = None) -> tuple[int, int | None]:
    """(channels, side) of the images a dataset yields with these options (side None: not known in advance)."""
    _, native, channels = REGISTRY[name]
    return channels, image_size or center_crop or native


def load(name: str, opts: DatasetOptions) -> ImageDataset:
    """Load dataset ``name`` with ``opts``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASET_NAMES)}")
    return importlib.import_module(REGISTRY[name][0]).load(opts)


__all__ = ["DATASET_NAMES", "REGISTRY", "DatasetOptions", "ImageDataset", "image_shape", "load"]
