"""What every dataset loader returns, the shared image transforms, and checksummed downloads.

A loader returns an :class:`ImageDataset`: the labels of every image, the official split where the
dataset has one (``pool``: 0 = official train, 1 = official test), and a ``read`` function that
decodes only the images asked for. The data stage first chooses indices, then decodes: a CelebA or
ArtBench run reads its 6000 images, not the whole dataset.

Transforms follow torchvision's semantics without torchvision (it cannot be imported here):
``CenterCrop(c)`` puts the crop's top-left corner at ``round((h - c) / 2), round((w - c) / 2)``;
``Resize(s)`` is PIL's bilinear resize, which antialiases when it shrinks, as torchvision does on PIL
images. Pixels are scaled to [-1, 1], channels first.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dtrak_ray.errors import ConfigError, MissingArtifactError

Reader = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ImageDataset:
    """Labels of every image, the official split (if any), and a reader of images by index.

    ``read(indices)`` returns (n, C, H, W) float32 in [-1, 1]; ``class_names[label]`` names a label.
    """

    name: str
    labels: np.ndarray
    read: Reader
    pool: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    @property
    def images(self) -> np.ndarray:
        """Every image, decoded (small datasets only)."""
        return self.read(np.arange(len(self.labels)))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DatasetOptions:
    """Where the data lives and how images are shaped (mirrors ``DataConfig``)."""

    path: str | None = None
    classes: tuple[int | str, ...] | None = None
    image_size: int | None = None
    center_crop: int | None = None
    download: bool = False


def to_array(img, center_crop: int | None = None, size: int | None = None) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """One PIL image -> (C, H, W) float32 in [-1, 1], after an optional center crop and resize."""
    from PIL import Image

    img = img.convert("RGB")
    if center_crop is not None:
        w, h = img.size
        if center_crop > min(w, h):
            raise ConfigError(f"data.center_crop={center_crop} is larger than an image ({w}x{h}): lower it or set it to null")
        top, left = int(round((h - center_crop) / 2.0)), int(round((w - center_crop) / 2.0))
        img = img.crop((left, top, left + center_crop, top + center_crop))
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def read_image_files(paths: Sequence[Path], center_crop: int | None, size: int | None, what: str) -> np.ndarray:
    """Decode image files into one (n, C, H, W) array, with a progress bar when there are many."""
    from PIL import Image
    from rich.progress import track

    out = []
    for p in track(paths, description=f"decode {what}", disable=len(paths) < 500, transient=True):
        with Image.open(p) as img:
            out.append(to_array(img, center_crop, size))
    if not out:
        return np.zeros((0, 3, size or 1, size or 1), dtype=np.float32)
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise ConfigError(f"{what}: images have different sizes {sorted(shapes)[:3]}: set data.image_size to resize them all")
    return np.stack(out)


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_and_extract(url: str, md5: str, dest: Path) -> None:
    """Fetch an archive, check its md5 before anything is extracted, and unpack it into ``dest``.

    The archive is written to a temporary file first, so an interrupted or corrupt download never
    leaves a half-populated dataset directory behind.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / "archive"
        try:
            with urllib.request.urlopen(url) as resp, open(archive, "wb") as out:  # noqa: S310 - the URL comes from the registry
                shutil.copyfileobj(resp, out)
        except OSError as exc:
            raise MissingArtifactError(f"could not download {url}: {exc}; download it by hand and set data.path") from None
        got = md5sum(archive)
        if got != md5:
            raise MissingArtifactError(f"{url}: md5 {got} does not match the expected {md5}: the download is corrupt, retry it")
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")


def require_dir(path: str | None, dataset: str, hint: str) -> Path:
    """The dataset directory, or an error naming ``data.path`` and what belongs there."""
    if path is None:
        raise ConfigError(f"data.path is not set: dataset {dataset} needs {hint}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise MissingArtifactError(f"data.path={path} is not a directory: dataset {dataset} needs {hint}")
    return p
