"""CIFAR-10 (and CIFAR-2 = classes 1 and 7 of it) in the official python pickle format.

Layout (``data.path`` is the folder holding ``cifar-10-batches-py/``, or that folder itself)::

    cifar-10-batches-py/data_batch_1 .. data_batch_5   50000 training images
    cifar-10-batches-py/test_batch                     10000 test images
    cifar-10-batches-py/batches.meta                   label_names

Each batch is a pickled dict with ``b"data"`` (n, 3072) uint8, rows R then G then B planes of
32x32, and ``b"labels"``. The official train batches are pool 0, the test batch pool 1: the
split takes train images from the former and Val images from the latter (SPEC.md section 4).
With ``data.download: true`` the official archive is fetched and its md5 checked.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from dtrak_ray.datasets.base import DatasetOptions, ImageDataset, download_and_extract, require_dir, to_array
from dtrak_ray.errors import ConfigError, MissingArtifactError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
HINT = f"the official python version of CIFAR-10 ({URL}, unpacked: {FOLDER}/data_batch_1..5, test_batch, batches.meta)"


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def batches_dir(opts: DatasetOptions) -> Path:
    """The ``cifar-10-batches-py`` folder, downloading it first when asked to."""
    if opts.path is None:
        raise ConfigError(f"data.path is not set: cifar10 needs {HINT}")
    root = Path(opts.path).expanduser()
    for cand in (root / FOLDER, root):
        if (cand / "batches.meta").is_file():
            return cand
    if opts.download:
        download_and_extract(URL, MD5, root)
        return root / FOLDER
    require_dir(opts.path, "cifar10", HINT)
    raise MissingArtifactError(f"no {FOLDER}/batches.meta under data.path={opts.path}: cifar10 needs {HINT}, or set data.download: true")


def load(opts: DatasetOptions) -> ImageDataset:
    """CIFAR-10 restricted to ``data.classes`` (label ids 0..9; all ten when unset)."""
    folder = batches_dir(opts)
    names = tuple(n.decode() for n in _unpickle(folder / "batches.meta")[b"label_names"])
    parts, labels, pools = [], [], []
    for pool, batch in [(0, b) for b in TRAIN_BATCHES] + [(1, TEST_BATCH)]:
        path = folder / batch
        if not path.is_file():
            raise MissingArtifactError(f"{path} is missing: cifar10 needs {HINT}")
        d = _unpickle(path)
        parts.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d[b"labels"], dtype=np.int64))
        pools.append(np.full(len(labels[-1]), pool, dtype=np.int8))
    data, y, pool_of = np.concatenate(parts), np.concatenate(labels), np.concatenate(pools)
    classes = tuple(range(len(names))) if opts.classes is None else tuple(opts.classes)
    bad = [c for c in classes if not isinstance(c, int) or not 0 <= c < len(names)]
    if bad or len(set(classes)) != len(classes):
        raise ConfigError(f"data.classes {list(classes)}: cifar10 takes distinct label ids 0..9, e.g. [1, 7] for CIFAR-2")
    keep = np.flatnonzero(np.isin(y, classes))
    data, y, pool_of = data[keep], y[keep], pool_of[keep]
    size, crop = opts.image_size, opts.center_crop

    def read(idx: np.ndarray) -> np.ndarray:
        raw = data[np.asarray(idx, dtype=np.int64)]
        if size in (None, 32) and crop is None:
            return raw.astype(np.float32) / 127.5 - 1.0
        from PIL import Image

        imgs = [to_array(Image.fromarray(r.transpose(1, 2, 0)), crop, size) for r in raw]
        return np.stack(imgs) if imgs else np.zeros((0, 3, size or 32, size or 32), np.float32)

    name = "cifar2" if len(classes) == 2 else f"cifar{len(classes)}"
    return ImageDataset(name, y, read, pool_of, names, {"source": str(folder)})


def write_cifar_batches(root: Path, images: np.ndarray, labels: np.ndarray, n_test: int) -> Path:
    """Write (n, 3, 32, 32) uint8 images in the official format (the last ``n_test`` as test_batch).

    Used to build small datasets in the real format for the tests and for users' smoke runs.
    """
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    n_train = len(images) - n_test
    flat = images.reshape(len(images), -1)
    splits = np.array_split(np.arange(n_train), 5)
    for i, rows in enumerate(splits, start=1):
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels[rows].tolist(), b"data": flat[rows],
                 b"filenames": [f"img_{r}.png".encode() for r in rows]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test_rows = np.arange(n_train, len(images))
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": labels[test_rows].tolist(), b"data": flat[test_rows],
            b"filenames": [f"img_{r}.png".encode() for r in test_rows]}
    (folder / TEST_BATCH).write_bytes(pickle.dumps(test))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_cases_per_batch": 10000, b"num_vis": 3072}))
    return folder
