"""Any folder of images, one class per subfolder: a user's own dataset (and ArtBench's layout).

Two layouts are accepted (``data.path``)::

    root/{class}/*.{jpg,jpeg,png,webp,bmp}                 no official split: Val is drawn at random
    root/train/{class}/*  and  root/test/{class}/*         an official split (pool 0 train, 1 test)

Classes are the subfolder names, sorted, or the ones listed in ``data.classes`` (in that order:
label i is ``data.classes[i]``). Files are taken in sorted order, so indices are stable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dtrak_ray.datasets.base import DatasetOptions, ImageDataset, read_image_files, require_dir
from dtrak_ray.errors import ConfigError, MissingArtifactError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SPLIT_DIRS = ("train", "test")
HINT = "one subfolder of images per class (root/{class}/*.jpg), or root/train/{class}/ and root/test/{class}/"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)


def scan(root: Path, classes: tuple[str, ...] | None, dataset: str) -> tuple[list[Path], np.ndarray, np.ndarray | None, tuple[str, ...]]:
    """(files, labels, pool or None, class names) of a class-per-subfolder tree."""
    split = all((root / s).is_dir() for s in SPLIT_DIRS)
    tops = [root / s for s in SPLIT_DIRS] if split else [root]
    found = sorted({d.name for top in tops for d in top.iterdir() if d.is_dir()})
    if not found:
        raise MissingArtifactError(f"no class subfolders under data.path={root}: {dataset} needs {HINT}")
    names = tuple(found) if classes is None else tuple(str(c) for c in classes)
    absent = [c for c in names if c not in found]
    if absent or not names:
        raise ConfigError(
            f"data.classes: {absent or 'no classes'} not found under data.path={root} (found {found[:10]}): "
            f"{dataset} needs {HINT}"
        )
    files: list[Path] = []
    labels: list[int] = []
    pools: list[int] = []
    for pool, top in enumerate(tops):
        for label, name in enumerate(names):
            if not (top / name).is_dir():
                raise MissingArtifactError(f"{top / name} is missing: with a train/test split every class needs a folder in both")
            got = _images_in(top / name)
            files += got
            labels += [label] * len(got)
            pools += [pool] * len(got)
    if not files:
        raise MissingArtifactError(f"no images ({', '.join(sorted(EXTENSIONS))}) under data.path={root}: {dataset} needs {HINT}")
    return files, np.array(labels, dtype=np.int64), np.array(pools, dtype=np.int8) if split else None, names


def load_tree(opts: DatasetOptions, dataset: str) -> ImageDataset:
    root = require_dir(opts.path, dataset, HINT)
    files, labels, pool, names = scan(root, None if opts.classes is None else tuple(map(str, opts.classes)), dataset)
    crop, size = opts.center_crop, opts.image_size

    def read(idx: np.ndarray) -> np.ndarray:
        return read_image_files([files[i] for i in np.asarray(idx, dtype=np.int64)], crop, size, dataset)

    return ImageDataset(dataset, labels, read, pool, names, {"source": str(root)})


def load(opts: DatasetOptions) -> ImageDataset:
    """A class-per-subfolder image tree at ``data.path``."""
    return load_tree(opts, "folder")


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], pool: np.ndarray | None = None) -> Path:
    """Write (n, H, W, 3) uint8 images as a class-per-subfolder tree of JPEGs (tests, smoke runs)."""
    from PIL import Image

    root = Path(root)
    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        top = root if pool is None else root / SPLIT_DIRS[int(pool[i])]
        d = top / class_names[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:06d}.jpg", quality=95)
    return root
