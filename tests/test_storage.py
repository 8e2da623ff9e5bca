"""The store, one suite over two backends: a local directory and S3 (an in-process moto server)."""

from __future__ import annotations

import pickle
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrak_ray.errors import MissingArtifactError, StoreError
from dtrak_ray.storage import RunStore, Store, storage_options_from_env
from tests.s3server import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, all_objects, clear_s3fs_cache, start_moto

FAST_FAIL = {"config_kwargs": {"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 1}}, "retries": 1}


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """One moto server for the module: ``s3://dtrak-test/prefix`` (env vars set while it runs)."""
    url, stop = start_moto()
    yield url
    stop()


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store URL: a tmp directory, or a distinct prefix on the moto bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    base = request.getfixturevalue("moto_url")
    clear_s3fs_cache()
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)
    return f"{base}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def run(store_url: str) -> RunStore:
    """Run ``r1`` of a fresh store."""
    return Store(store_url).run("r1")


# ---- small files ------------------------------------------------------------------------------


def test_json_text_bytes_round_trip(run: RunStore) -> None:
    """Small files come back identical; numpy values in JSON become plain numbers/lists."""
    assert not run.exists(RunStore.SUMMARY)
    run.write_json(RunStore.SUMMARY, {"lds": np.float32(0.5), "per_seed": np.array([1, 2]), "p": Path("a/b")})
    assert run.exists(RunStore.SUMMARY)
    assert run.read_json(RunStore.SUMMARY) == {"lds": 0.5, "per_seed": [1, 2], "p": "a/b"}

    run.write_text(RunStore.CONFIG, "name: tiny\nseed: 7\n")
    assert run.read_text(RunStore.CONFIG) == "name: tiny\nseed: 7\n"

    blob = bytes(range(256)) * 3
    run.write_bytes(RunStore.report_file("fig.png"), blob)
    assert run.read_bytes(RunStore.report_file("fig.png")) == blob
    run.write_bytes(RunStore.report_file("fig.png"), b"v2")  # overwrite
    assert run.read_bytes(RunStore.report_file("fig.png")) == b"v2"
    assert run.exists(RunStore.report_file("fig.png"))
    assert not run.exists(RunStore.report_file("other.png"))


def test_local_write_leaves_no_temp_files(tmp_path: Path) -> None:
    """The local atomic write renames its temp file away."""
    run = Store(str(tmp_path / "s")).run("r")
    run.write_json(RunStore.LDS, {"a": 1})
    files = sorted(p.name for p in (tmp_path / "s" / "r" / "results").iterdir())
    assert files == ["lds.json"]


def test_missing_key_raises_missing_artifact(run: RunStore) -> None:
    """Reading a key nobody wrote raises MissingArtifactError, which is a FileNotFoundError."""
    with pytest.raises(MissingArtifactError) as info:
        run.read_json(RunStore.SUMMARY)
    assert isinstance(info.value, FileNotFoundError)
    assert run.url(RunStore.SUMMARY) in str(info.value)
    with pytest.raises(FileNotFoundError):
        run.read_bytes("nope/nothing.bin")


# ---- arrays -----------------------------------------------------------------------------------


def test_create_array_write_chunk_from_fresh_handle(run: RunStore) -> None:
    """Rows of one chunk written through a new ``r+`` handle read back; the rest stays 0; attrs kept."""
    key = RunStore.features("base", "val", "l_simple", 4, "rademacher", 8)
    attrs = {"K": 4, "projector": "rademacher", "k": np.int64(8), "timesteps": np.arange(3)}
    arr = run.create_array(key, shape=(6, 8), chunks=(2, 8), dtype="float32", attrs=attrs)
    assert arr.shape == (6, 8) and arr.chunks == (2, 8)

    rows = np.arange(16, dtype=np.float32).reshape(2, 8) + 0.25
    handle = run.open_array(key, mode="r+")
    handle[2:4] = rows

    back = run.read_array(key)
    expected = np.zeros((6, 8), dtype=np.float32)
    expected[2:4] = rows
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, expected)
    assert dict(run.open_array(key).attrs) == {"K": 4, "projector": "rademacher", "k": 8, "timesteps": [0, 1, 2]}
    assert run.exists(key)


def test_create_array_replaces_existing(run: RunStore) -> None:
    """create_array over an existing array gives a fresh one (new shape, zeros, new attrs)."""
    key = RunStore.GEN
    run.write_array(key, np.ones((4, 1, 2, 2), dtype=np.float32), {"v": 1})
    run.create_array(key, shape=(3, 2), chunks=(3, 2), dtype="int32", attrs={"v": 2})
    back = run.read_array(key)
    assert back.shape == (3, 2) and back.dtype == np.int32
    np.testing.assert_array_equal(back, np.zeros((3, 2), dtype=np.int32))
    assert dict(run.open_array(key).attrs) == {"v": 2}


def test_open_missing_array_raises(run: RunStore) -> None:
    """open_array / read_array on an array nobody wrote raise MissingArtifactError."""
    key = RunStore.scores("base", "gen", "l_square", 2, "gaussian", 64)
    with pytest.raises(MissingArtifactError) as info:
        run.open_array(key)
    assert isinstance(info.value, FileNotFoundError)
    assert "does not exist" in str(info.value)
    with pytest.raises(MissingArtifactError):
        run.read_array(key)


def test_write_group_read_array(run: RunStore) -> None:
    """Each array of a group reads back with its values, dtype and the shared attrs."""
    rng = np.random.default_rng(0)
    arrays = {
        "train": np.arange(40, dtype=np.int64),
        "val": np.array([3, 1, 4], dtype=np.int64),
        "labels": rng.integers(0, 2, size=40).astype(np.int8),
        "masks": rng.random((6, 40)) < 0.5,
    }
    run.write_group(RunStore.INDICES, arrays, {"seed": 7, "alpha": 0.5})
    for name, data in arrays.items():
        back = run.read_array(f"{RunStore.INDICES}/{name}")
        assert back.dtype == data.dtype, name
        np.testing.assert_array_equal(back, data)
        assert dict(run.open_array(f"{RunStore.INDICES}/{name}").attrs) == {"seed": 7, "alpha": 0.5}


# ---- markers ----------------------------------------------------------------------------------


def test_markers(run: RunStore) -> None:
    """done() is False before mark_done, True after, False on a digest mismatch, False once cleared."""
    key = RunStore.outputs("gen")
    assert not run.done(key)
    assert not run.done(key, digest="abc")
    run.clear_marker(key)  # clearing an absent marker is a no-op
    run.mark_done(key, digest="abc", n=3)
    assert run.done(key)
    assert run.done(key, digest="abc")
    assert not run.done(key, digest="xyz")
    meta = run.read_json(f"_markers/{key}.json")
    assert meta["key"] == key and meta["digest"] == "abc" and meta["n"] == 3
    assert abs(meta["time"] - time.time()) < 120
    assert not run.done(RunStore.outputs("val"))  # markers are per key
    run.clear_marker(key)
    assert not run.done(key)
    assert not run.exists(f"_markers/{key}.json")


def test_marker_without_digest_fails_digest_check(run: RunStore) -> None:
    """A marker written without a digest does not satisfy a request for a specific digest."""
    run.mark_done(RunStore.REPORT)
    assert run.done(RunStore.REPORT)
    assert not run.done(RunStore.REPORT, digest="d")


# ---- model directories ------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_put_dir_local_dir_round_trip(run: RunStore, tmp_path: Path) -> None:
    """Nested files uploaded with put_dir come back byte-identical from local_dir."""
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(np.random.default_rng(1).bytes(5000))
    (src / "sub" / "deeper" / "x.txt").write_text("deep")
    key = RunStore.subset_model(3, 0)
    run.put_dir(src, key)
    assert run.exists(key)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    got = run.local_dir(key, scratch)
    assert _tree(got) == _tree(src)
    assert set(_tree(got)) == {"config.json", "sub/weights.bin", "sub/deeper/x.txt"}


def test_local_dir_missing_raises(run: RunStore, tmp_path: Path) -> None:
    """local_dir of a model nobody uploaded raises MissingArtifactError."""
    with pytest.raises(MissingArtifactError):
        run.local_dir(RunStore.base_model(9), tmp_path)


def test_diffusers_model_round_trip(run: RunStore, tmp_path: Path) -> None:
    """A real tiny UNet saved, uploaded, fetched and reloaded has an identical state_dict."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    key = RunStore.base_model(0)
    run.put_dir(saved, key)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    loaded = UNet2DModel.from_pretrained(run.local_dir(key, scratch))
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert loaded.config.block_out_channels == (8, 16) or list(loaded.config.block_out_channels) == [8, 16]


# ---- pickling (Ray ships stores to workers) ---------------------------------------------------


def test_store_pickles(store_url: str) -> None:
    """A pickled copy of a store reads what the original wrote, and vice versa."""
    store = Store(store_url)
    run = store.run("r1")
    run.write_json(RunStore.SUMMARY, {"x": 1})
    run.write_array(RunStore.GEN, np.arange(12, dtype=np.float32).reshape(3, 4), {"n": 3})
    run.mark_done(RunStore.GEN, digest="d1")

    copy = pickle.loads(pickle.dumps(store))
    assert copy.url == store.url and copy.storage_options == store.storage_options
    crun = copy.run("r1")
    assert crun.read_json(RunStore.SUMMARY) == {"x": 1}
    np.testing.assert_array_equal(crun.read_array(RunStore.GEN), np.arange(12, dtype=np.float32).reshape(3, 4))
    assert crun.done(RunStore.GEN, digest="d1")
    crun.write_text(RunStore.REPORT, "# from worker")
    assert run.read_text(RunStore.REPORT) == "# from worker"

    run_copy = pickle.loads(pickle.dumps(run))  # RunStore pickles too (its Store rebuilds)
    assert run_copy.read_json(RunStore.SUMMARY) == {"x": 1}


# ---- unreachable stores -----------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_bucket_raises_store_error(moto_url: str) -> None:
    """A bucket that does not exist (on a live endpoint) raises StoreError naming the URL."""
    url = "s3://no-such-bucket-xyz/p"
    t0 = time.monotonic()
    with pytest.raises(StoreError) as info:
        Store(url, storage_options={**storage_options_from_env(), **FAST_FAIL})
    assert isinstance(info.value, OSError)
    assert url in str(info.value)
    assert time.monotonic() - t0 < 10


def test_closed_endpoint_raises_store_error() -> None:
    """An S3 endpoint nobody listens on raises StoreError naming the URL, quickly."""
    url = "s3://dtrak-test/p"
    opts = {**FAST_FAIL, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{_closed_port()}"},
            "key": "AKIAUNREACHABLE", "secret": "unreachable-secret-value"}
    clear_s3fs_cache()
    t0 = time.monotonic()
    with pytest.raises(StoreError) as info:
        Store(url, storage_options=opts)
    assert url in str(info.value)
    assert "unreachable-secret-value" not in str(info.value)
    assert time.monotonic() - t0 < 15


def test_local_store_on_a_file_raises_store_error(tmp_path: Path) -> None:
    """A local store whose root is an existing regular file cannot be created: StoreError."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError) as info:
        Store(str(blocker / "store"))
    assert str(blocker / "store") in str(info.value)


# ---- credentials never reach the store --------------------------------------------------------


def test_no_secret_in_bucket(moto_url: str, tmp_path: Path) -> None:
    """After arrays, JSON, markers and a model dir are written, no object contains the credentials."""
    clear_s3fs_cache()
    store = Store(f"{moto_url}/secret-scan-{uuid.uuid4().hex[:8]}")
    assert FAKE_SECRET_KEY not in pickle.dumps(store).decode("latin-1")
    run = store.run("r1")
    run.write_json(RunStore.SUMMARY, {"lds": 0.1})
    run.write_text(RunStore.CONFIG, "name: t\n")
    run.write_array(RunStore.GEN, np.ones((2, 3), dtype=np.float32), {"note": "gen"})
    arr = run.create_array(RunStore.features("base", "val", "l_simple", 2, "gaussian", 4), (4, 4), (2, 4), "float32", {"k": 4})
    arr[0:2] = 1.0
    run.mark_done(RunStore.GEN, digest="d")
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text("{}")
    run.put_dir(src, RunStore.base_model(0))

    objects = all_objects("dtrak-test")
    ours = {k: v for k, v in objects.items() if "/secret-scan-" in k}
    assert len(ours) >= 7, sorted(ours)
    for key, body in objects.items():
        assert FAKE_SECRET_KEY.encode() not in body, key
        assert FAKE_ACCESS_KEY.encode() not in body, key


# ---- a second writer (another Ray process) ----------------------------------------------------


def test_sees_writes_of_another_instance(store_url: str, tmp_path: Path) -> None:
    """A store instance sees markers, files, arrays and models written by a separate filesystem
    instance after it had already looked (and found nothing): no stale listing caches."""
    reader = Store(store_url).run("r1")
    opts = {**storage_options_from_env(), "skip_instance_cache": True}  # a distinct s3fs instance
    writer = Store(store_url, storage_options=opts).run("r1")
    if not reader.store.is_local:
        assert writer.fs is not reader.fs

    key = RunStore.features("base", "train", "l_simple", 2, "gaussian", 4)
    model = RunStore.base_model(1)
    assert not reader.done(key) and not reader.exists(RunStore.SUMMARY) and not reader.exists(model)
    with pytest.raises(MissingArtifactError):
        reader.read_array(key)

    writer.write_array(key, np.full((2, 4), 3.0, dtype=np.float32), {"k": 4})
    writer.mark_done(key, digest="d")
    writer.write_json(RunStore.SUMMARY, {"ok": True})
    src = tmp_path / "m"
    src.mkdir()
    (src / "a.bin").write_bytes(b"abc")
    writer.put_dir(src, model)

    assert reader.done(key, digest="d")
    assert reader.exists(RunStore.SUMMARY) and reader.read_json(RunStore.SUMMARY) == {"ok": True}
    np.testing.assert_array_equal(reader.read_array(key), np.full((2, 4), 3.0, dtype=np.float32))
    assert (reader.local_dir(model, tmp_path) / "a.bin").read_bytes() == b"abc"

    writer.clear_marker(key)
    assert not reader.done(key)


def test_moto_s3_context_restores_env() -> None:
    """The helper's context manager sets the fake credentials and endpoint, then restores the env."""
    import os

    from tests.s3server import moto_s3

    before = {k: os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
    with moto_s3(bucket="ctx-bucket") as url:
        assert url == "s3://ctx-bucket/prefix"
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET_KEY
        assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
        run = Store(url).run("r")
        run.write_text("x.txt", "hi")
        assert run.read_text("x.txt") == "hi"
    assert {k: os.environ.get(k) for k in before} == before
