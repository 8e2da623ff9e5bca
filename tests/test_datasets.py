"""Dataset loaders on small files written in each dataset's real format, and through the data stage.

Nothing can be downloaded here, so each test writes a few images in the official layout (CIFAR-10
python pickles, CelebA JPEGs + partition file, ArtBench's train/test style folders, a plain class
folder tree) and checks what the loader returns against an independent computation on those files.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
from rich.console import Console

from dtrak_ray.config import parse_config
from dtrak_ray.data import load_dataset, split_indices
from dtrak_ray.datasets.base import download_and_extract, to_array
from dtrak_ray.datasets.celeba import write_celeba
from dtrak_ray.datasets.cifar import write_cifar_batches
from dtrak_ray.datasets.folder import write_folder
from dtrak_ray.distributed.cluster import Resources
from dtrak_ray.errors import ConfigError, MissingArtifactError
from dtrak_ray.stages.common import Context
from dtrak_ray.stages.data import run_data
from dtrak_ray.storage import Store
from tests.conftest import tiny_config_dict


def _cifar(tmp_path, per_class_train=6, per_class_test=3, seed=0):
    rng = np.random.default_rng(seed)
    n_train, n_test = 10 * per_class_train, 10 * per_class_test
    labels = np.concatenate([np.repeat(np.arange(10), per_class_train), np.repeat(np.arange(10), per_class_test)])
    labels[:n_train] = rng.permutation(labels[:n_train])
    images = rng.integers(0, 256, size=(n_train + n_test, 3, 32, 32), dtype=np.uint8)
    write_cifar_batches(tmp_path, images, labels, n_test)
    return images, labels


def test_cifar_pickles_load_exact_pixels_and_official_split(tmp_path):
    images, labels = _cifar(tmp_path)
    ds = load_dataset("cifar10", (1, 7), path=str(tmp_path))
    keep = np.flatnonzero(np.isin(labels, (1, 7)))
    assert ds.name == "cifar2" and ds.class_names[1] == "automobile" and ds.class_names[7] == "horse"
    np.testing.assert_array_equal(ds.labels, labels[keep])
    # The official layout: rows of 3072 bytes, R then G then B planes of 32x32.
    expected = images[keep].reshape(len(keep), 3072).reshape(-1, 3, 32, 32).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(ds.read(np.arange(len(keep))), expected)
    assert (ds.pool[ds.labels == 1] == np.array([0] * 6 + [1] * 3)).all()
    # The batches folder itself also works as data.path; all ten classes when classes is null.
    assert len(load_dataset("cifar10", None, path=str(tmp_path / "cifar-10-batches-py"))) == 90


def test_cifar_split_draws_val_from_the_test_batch_stratified(tmp_path):
    _cifar(tmp_path)
    ds = load_dataset("cifar10", (1, 7), path=str(tmp_path))
    train, val = split_indices(ds.labels, 4, seed=42, n_train=8, pool=ds.pool)
    assert (ds.pool[train] == 0).all() and (ds.pool[val] == 1).all()
    assert np.bincount(ds.labels[train])[[1, 7]].tolist() == [4, 4]
    assert np.bincount(ds.labels[val])[[1, 7]].tolist() == [2, 2]
    again = split_indices(ds.labels, 4, seed=42, n_train=8, pool=ds.pool)
    assert all((a == b).all() for a, b in zip((train, val), again, strict=True))
    with pytest.raises(ConfigError, match="data.n_val=7 is larger than the official test split"):
        split_indices(ds.labels, 7, seed=42, pool=ds.pool)


def test_cifar_resize_and_bad_classes(tmp_path):
    _cifar(tmp_path)
    ds = load_dataset("cifar10", (1, 7), path=str(tmp_path), image_size=16)
    assert ds.read(np.arange(3)).shape == (3, 3, 16, 16)
    with pytest.raises(ConfigError, match="label ids 0..9"):
        load_dataset("cifar10", (1, 12), path=str(tmp_path))
    with pytest.raises(MissingArtifactError, match="cifar-10-batches-py"):
        load_dataset("cifar10", (1, 7), path=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="data.path is not set"):
        load_dataset("cifar10", (1, 7))


def test_download_checks_md5_before_extracting(tmp_path):
    src = tmp_path / "src"
    _cifar(src)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(MissingArtifactError, match="does not match"):
        download_and_extract(archive.as_uri(), "0" * 32, tmp_path / "bad")
    assert not (tmp_path / "bad" / "cifar-10-batches-py").exists()
    download_and_extract(archive.as_uri(), md5, tmp_path / "good")
    assert len(load_dataset("cifar10", (1, 7), path=str(tmp_path / "good"))) == 18


def _two_tone(h, w, crop, inner, outer):
    """An h x w image whose central crop x crop square is ``inner`` and the rest ``outer``."""
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[...] = outer
    top, left = round((h - crop) / 2), round((w - crop) / 2)
    img[top : top + crop, left : left + crop] = inner
    return img


def test_celeba_partitions_and_center_crop(tmp_path):
    # CelebA's aligned images are 178 wide, 218 high; the paper crops the central 140 square.
    inner, outer = (200, 40, 90), (10, 220, 30)
    imgs = np.stack([_two_tone(218, 178, 140, inner, outer)] * 7)
    write_celeba(tmp_path, imgs, np.array([0, 0, 0, 1, 2, 2, 0]))
    ds = load_dataset("celeba", None, path=str(tmp_path), image_size=64, center_crop=140)
    assert len(ds) == 6  # the "valid" partition (1) stays out
    assert ds.pool.tolist() == [0, 0, 0, 1, 1, 0]
    x = ds.read(np.array([0, 4]))
    assert x.shape == (2, 3, 64, 64)
    # Away from the crop's edge (JPEG blurs edges) every pixel is the inner colour.
    want = np.array(inner, dtype=np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(x[:, :, 4:-4, 4:-4], np.broadcast_to(want[None, :, None, None], (2, 3, 56, 56)), atol=0.06)
    # Without the crop the outer colour shows at the top-left corner.
    full = load_dataset("celeba", None, path=str(tmp_path), image_size=64).read(np.array([0]))
    np.testing.assert_allclose(full[0, :, 1, 1], np.array(outer) / 127.5 - 1.0, atol=0.06)
    with pytest.raises(ConfigError, match="celeba has no classes"):
        load_dataset("celeba", (1, 2), path=str(tmp_path))
    (tmp_path / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(MissingArtifactError, match="000002.jpg"):
        load_dataset("celeba", None, path=str(tmp_path))


def test_to_array_matches_torchvision_centercrop_offsets():
    from PIL import Image

    # Odd margins: torchvision puts the crop at round((h - c) / 2); here rows 2..4 and cols 1..3.
    arr = np.arange(7 * 5 * 3, dtype=np.uint8).reshape(7, 5, 3)
    got = to_array(Image.fromarray(arr), center_crop=3)
    top, left = int(round((7 - 3) / 2.0)), int(round((5 - 3) / 2.0))
    want = arr[top : top + 3, left : left + 3].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(got, want)


def test_artbench_styles_split_and_captions(tmp_path):
    styles = ["post_impressionism", "ukiyo_e", "baroque"]
    colours = {0: (250, 0, 0), 1: (0, 250, 0), 2: (0, 0, 250)}
    labels = np.array([0, 1, 2] * 4)
    pool = np.array([0] * 9 + [1] * 3)
    imgs = np.stack([np.full((256, 256, 3), colours[int(y)], np.uint8) for y in labels])
    write_folder(tmp_path, imgs, labels, styles, pool)
    ds = load_dataset("artbench", ["ukiyo_e", "post_impressionism"], path=str(tmp_path), image_size=32)
    assert ds.class_names == ("ukiyo_e", "post_impressionism") and ds.meta["captions"] == [
        "a ukiyo-e painting", "a post-impressionism painting"]
    assert len(ds) == 8 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 0, 1] and ds.pool.tolist() == [0] * 6 + [1] * 2
    x = ds.read(np.arange(len(ds)))
    assert x.shape == (8, 3, 32, 32)
    green = np.array([0, 250, 0]) / 127.5 - 1.0
    np.testing.assert_allclose(x[ds.labels == 0].mean(axis=(2, 3)), np.tile(green, (4, 1)), atol=0.03)
    with pytest.raises(ConfigError, match="not ArtBench styles"):
        load_dataset("artbench", ["cubism"], path=str(tmp_path))
    with pytest.raises(ConfigError, match="needs the styles"):
        load_dataset("artbench", None, path=str(tmp_path))


def test_folder_of_classes_without_official_split(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(9, 20, 20, 3), dtype=np.uint8)
    write_folder(tmp_path, imgs, np.array([0, 1, 2] * 3), ["cats", "dogs", "owls"])
    ds = load_dataset("folder", None, path=str(tmp_path))
    assert ds.class_names == ("cats", "dogs", "owls") and ds.pool is None
    assert ds.read(np.arange(9)).shape == (9, 3, 20, 20)
    train, val = split_indices(ds.labels, 3, seed=0)
    assert sorted(ds.labels[val].tolist()) == [0, 1, 2] and len(train) == 6
    with pytest.raises(ConfigError, match="not found under data.path"):
        load_dataset("folder", ["cats", "bats"], path=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingArtifactError, match="no class subfolders"):
        load_dataset("folder", None, path=str(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ({"dataset": "imagenet"}, "data.dataset: unknown dataset 'imagenet'"),
        ({"dataset": "digits-2", "classes": [3, 3]}, "two different digits"),
        ({"dataset": "cifar10", "classes": [1, 1]}, "repeat a class"),
    ],
)
def test_config_names_the_data_field(override, hint):
    raw = tiny_config_dict()
    raw["data"] = {**raw["data"], **override}
    with pytest.raises(ConfigError, match=hint):
        parse_config(raw)


def test_config_checks_images_fit_the_model():
    raw = tiny_config_dict()
    raw["data"] = {"dataset": "cifar10", "classes": [1, 7], "path": "/x", "n_val": 4}
    with pytest.raises(ConfigError, match="model.channels=1 but cifar10 images have 3"):
        parse_config(raw)
    raw["model"] = {**raw["model"], "channels": 3}
    with pytest.raises(ConfigError, match="set model.sample_size=32 or data.image_size=8"):
        parse_config(raw)
    raw["data"]["image_size"] = 8
    assert parse_config(raw).data.image_size == 8


def test_cifar2_through_the_data_stage(tmp_path):
    _cifar(tmp_path / "cifar")
    raw = tiny_config_dict("cifar-stage")
    raw["data"] = {"dataset": "cifar10", "classes": [1, 7], "path": str(tmp_path / "cifar"), "n_train": 8, "n_val": 4, "image_size": 8}
    raw["model"] = {**raw["model"], "channels": 3}
    raw["lds"] = {**raw["lds"], "num_subsets": 4}
    cfg = parse_config(raw)
    run = Store(str(tmp_path / "store")).run(cfg.name)
    run_data(Context(cfg, run, Resources(workers=1), Console(file=io.StringIO())), "digest")
    x = run.read_array(f"{run.INDICES}/train_images")
    assert x.shape == (8, 3, 8, 8) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    assert sorted(set(run.read_array(f"{run.INDICES}/val_labels").tolist())) == [1, 7]
    attrs = dict(run.open_array(f"{run.INDICES}/train").attrs)
    assert attrs["class_names"][7] == "horse" and attrs["official_split"] is True and attrs["image_size"] == 8
    masks = run.read_array(f"{run.INDICES}/masks")
    assert masks.shape == (4, 8) and (masks.sum(1) == 4).all()


def test_pickle_format_is_the_official_one(tmp_path):
    # What the official archive holds: a dict keyed by bytes, readable with encoding="bytes".
    _cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert set(d) == {b"batch_label", b"labels", b"data", b"filenames"} and d[b"data"].shape == (12, 3072)
