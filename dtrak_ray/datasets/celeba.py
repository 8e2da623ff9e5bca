"""CelebA (aligned and cropped faces) with its official partition file.

Layout (``data.path``)::

    img_align_celeba/000001.jpg ...     178x218 JPEGs
    list_eval_partition.txt             "000001.jpg 0" per line: 0 train, 1 valid, 2 test

The paper's setting (SPEC.md section 4): 5000 train images from the official train partition,
1000 Val images from the official test partition, CenterCrop(140) then resize to 64x64. The
valid partition is not used. CelebA is distributed through Google Drive, which has no stable
direct link, so there is no download: fetch ``img_align_celeba.zip`` and the partition file by
hand (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html) and point ``data.path`` at them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dtrak_ray.datasets.base import DatasetOptions, ImageDataset, read_image_files, require_dir
from dtrak_ray.errors import ConfigError, MissingArtifactError

PARTITION_FILE = "list_eval_partition.txt"
IMAGES = "img_align_celeba"
HINT = f"CelebA's {IMAGES}/*.jpg and {PARTITION_FILE} (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html)"
# Official partition id -> our pool (0 train, 1 Val); "valid" (1) stays out.
POOLS = {0: 0, 2: 1}


def read_partition(path: Path) -> list[tuple[str, int]]:
    """(file name, partition) pairs of list_eval_partition.txt, in file order."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise MissingArtifactError(f"{path}:{n}: expected '<file>.jpg <0|1|2>', got {line!r}")
        rows.append((parts[0], int(parts[1])))
    return rows


def load(opts: DatasetOptions) -> ImageDataset:
    """CelebA with one class; images center-cropped (``data.center_crop``) and resized (``data.image_size``)."""
    if opts.classes is not None:
        raise ConfigError("celeba has no classes: set data.classes: null")
    root = require_dir(opts.path, "celeba", HINT)
    part_file = root / PARTITION_FILE
    if not part_file.is_file():
        raise MissingArtifactError(f"{part_file} is missing: celeba needs {HINT}")
    rows = [(f, POOLS[p]) for f, p in read_partition(part_file) if p in POOLS]
    files = [root / IMAGES / f for f, _ in rows]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MissingArtifactError(f"{len(missing)} images listed in {PARTITION_FILE} are missing, e.g. {missing[0]}: celeba needs {HINT}")
    pool = np.array([p for _, p in rows], dtype=np.int8)
    crop, size = opts.center_crop, opts.image_size

    def read(idx: np.ndarray) -> np.ndarray:
        return read_image_files([files[i] for i in np.asarray(idx, dtype=np.int64)], crop, size, "celeba")

    return ImageDataset("celeba", np.zeros(len(rows), dtype=np.int64), read, pool, ("face",), {"source": str(root)})


def write_celeba(root: Path, images: np.ndarray, partitions: np.ndarray) -> Path:
    """Write (n, H, W, 3) uint8 images as CelebA's JPEGs plus the partition file (tests, smoke runs)."""
    from PIL import Image

    root = Path(root)
    (root / IMAGES).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (img, p) in enumerate(zip(images, partitions, strict=True), start=1):
        name = f"{i:06d}.jpg"
        Image.fromarray(img).save(root / IMAGES / name, quality=95)
        lines.append(f"{name} {int(p)}")
    (root / PARTITION_FILE).write_text("\n".join(lines) + "\n")
    return root
