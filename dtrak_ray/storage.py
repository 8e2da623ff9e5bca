"""The store: every path, array, model directory and completion marker of a run lives here.

A store is a URL, a local directory or ``s3://bucket/prefix`` (any fsspec URL works), plus storage
options. Nothing else in dtrak-ray builds a path string: stages ask a :class:`RunStore` for the
key of what they read or write.

Layout of one run (keys relative to ``{store}/{run}/``)::

    config.yaml                                   the config that made the run (every field)
    data/indices.zarr/{train,val,labels,masks}    split indices, labels, LDS subset masks (M x N)
    models/base/seed-{s}/                         diffusers save_pretrained of the base model
    models/lds/subset-{m}/seed-{s}/               LDS subset models
    samples/gen.zarr                              the Gen test set (n, C, H, W)
    lds/outputs-{set}.zarr                        ground truth (M, seeds, noise seeds, n_test)
    features/{model}/{set}/{f}-K{K}-{proj}-k{k}.zarr      projected gradients (n, k)
    scores/{model}/{set}/{f}-K{K}-{proj}-k{k}.zarr        scores for every lambda (L, n_test, N)
    results/summary.json, results/lds.json        LDS records
    report/report.md, report/*.png                the report
    _markers/{key}.json                           completion markers (written last)

Contract: a key is complete only when its marker exists; a marker is written after the data, so
a partial write never looks finished. Credentials come from the environment (or the cloud's own
mechanisms) and are never written into the store.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr

from dtrak_ray.errors import MissingArtifactError, StoreError

_UMASK = os.umask(0)
os.umask(_UMASK)


def storage_options_from_env() -> dict[str, Any]:
    """Storage options for fsspec: ``DTRAK_STORAGE_OPTIONS`` (JSON) plus an S3 endpoint from
    ``AWS_ENDPOINT_URL``. Credentials are left to s3fs/botocore, which read the environment."""
    opts: dict[str, Any] = json.loads(os.environ.get("DTRAK_STORAGE_OPTIONS", "{}") or "{}")
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts.setdefault("client_kwargs", {}).setdefault("endpoint_url", endpoint)
    return opts


class Store:
    """A root URL plus storage options; hands out one :class:`RunStore` per run name."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/") or url
        self.storage_options = storage_options if storage_options is not None else storage_options_from_env()
        protocol = fsspec.core.split_protocol(self.url)[0]
        self.is_local = protocol in (None, "file", "local")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **({} if self.is_local else self.storage_options))
            if self.is_local:
                self.root = str(Path(self.root).resolve())
                self.fs.makedirs(self.root, exist_ok=True)
            else:
                bucket = self.root.split("/", 1)[0]
                self.fs.ls(bucket, refresh=True)  # fails fast on a missing bucket or bad credentials
        except Exception as exc:  # noqa: BLE001 - any backend error means the same thing to the user
            raise StoreError(
                f"store {self.url!r} cannot be reached ({type(exc).__name__}: {_short(exc)}); "
                "check the URL, that the bucket exists, and the credentials in the environment"
            ) from None

    def run(self, name: str) -> RunStore:
        """The part of the store that belongs to run ``name``."""
        return RunStore(self, name)

    def __getstate__(self) -> dict[str, Any]:
        # Ray ships stores to workers: send the URL, rebuild the filesystem there.
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]


class RunStore:
    """Keys and I/O for one run. Keys are relative paths like ``features/base/val/...``."""

    def __init__(self, store: Store, name: str):
        self.store, self.name = store, name
        self.fs = store.fs
        self.root = f"{store.root}/{name}"

    # ---- keys ---------------------------------------------------------------------------------
    CONFIG = "config.yaml"
    INDICES = "data/indices.zarr"
    GEN = "samples/gen.zarr"
    SUMMARY = "results/summary.json"
    LDS = "results/lds.json"
    REPORT = "report/report.md"

    @staticmethod
    def base_model(seed: int) -> str:
        return f"models/base/seed-{seed}"

    @staticmethod
    def subset_model(subset: int, seed: int) -> str:
        return f"models/lds/subset-{subset:03d}/seed-{seed}"

    @staticmethod
    def outputs(test_set: str) -> str:
        return f"lds/outputs-{test_set}.zarr"

    @staticmethod
    def features(model: str, split: str, f: str, K: int, projector: str, k: int) -> str:
        return f"features/{model}/{split}/{f}-K{K}-{projector}-k{k}.zarr"

    @staticmethod
    def scores(model: str, test_set: str, f: str, K: int, projector: str, k: int) -> str:
        return f"scores/{model}/{test_set}/{f}-K{K}-{projector}-k{k}.zarr"

    @staticmethod
    def report_file(name: str) -> str:
        return f"report/{name}"

    def path(self, key: str) -> str:
        """Filesystem path of a key (inside the store's filesystem)."""
        return f"{self.root}/{key}"

    def url(self, key: str = "") -> str:
        """Full URL of a key, for messages."""
        return f"{self.store.url}/{self.name}/{key}".rstrip("/")

    # ---- small files --------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a small file; on a local store via a temporary file and a rename (atomic)."""
        path = self.path(key)
        if self.store.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: keep a shared store readable
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "wb") as fh:  # an S3 PUT is atomic
                fh.write(data)

    def read_bytes(self, key: str) -> bytes:
        try:
            with self.fs.open(self.path(key), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise MissingArtifactError(f"{self.url(key)} does not exist: run the stage that writes it first") from None

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode()

    def write_json(self, key: str, obj: Any) -> None:
        self.write_text(key, json.dumps(obj, indent=2, sort_keys=False, default=_json_default))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_text(key))

    # ---- arrays -------------------------------------------------------------------------------
    def _zarr_store(self, key: str) -> Any:
        if self.store.is_local:
            return zarr.storage.LocalStore(self.path(key))
        return zarr.storage.FsspecStore.from_url(
            f"{self.store.url}/{self.name}/{key}", storage_options=self.store.storage_options
        )

    def create_array(
        self, key: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, attrs: dict[str, Any]
    ) -> zarr.Array:
        """Create (or replace) a chunked array carrying ``attrs`` as provenance."""
        return zarr.create_array(
            store=self._zarr_store(key),
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            attributes=_jsonable(attrs),
            overwrite=True,
            fill_value=0,
        )

    def open_array(self, key: str, mode: str = "r") -> zarr.Array:
        """Open an existing array; a missing one raises MissingArtifactError."""
        try:
            return zarr.open_array(store=self._zarr_store(key), mode=mode)
        except (FileNotFoundError, zarr.errors.NodeNotFoundError):
            raise MissingArtifactError(f"array {self.url(key)} does not exist: run the stage that writes it first") from None

    def write_array(self, key: str, data: np.ndarray, attrs: dict[str, Any], chunks: tuple[int, ...] | None = None) -> None:
        """Write a whole array at once (small arrays)."""
        arr = self.create_array(key, data.shape, chunks or data.shape, str(data.dtype), attrs)
        arr[...] = data

    def read_array(self, key: str) -> np.ndarray:
        return np.asarray(self.open_array(key)[...])

    def write_group(self, key: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Write several small arrays under one key (``key/name``), each with the same attributes."""
        for name, data in arrays.items():
            self.write_array(f"{key}/{name}", data, attrs)

    # ---- model directories --------------------------------------------------------------------
    def put_dir(self, local_dir: str | Path, key: str) -> None:
        """Upload every file of a local directory under ``key``."""
        local_dir = Path(local_dir)
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            remote = self.path(f"{key}/{file.relative_to(local_dir).as_posix()}")
            if self.store.is_local:
                Path(remote).parent.mkdir(parents=True, exist_ok=True)
            self.fs.put_file(str(file), remote)

    def local_dir(self, key: str, scratch: str | Path) -> Path:
        """A local directory holding ``key``'s files: the key itself on a local store, else a copy."""
        if not self.exists(key):
            raise MissingArtifactError(f"{self.url(key)} does not exist: run the stage that writes it first")
        if self.store.is_local:
            return Path(self.path(key))
        dest = Path(scratch) / key.replace("/", "_")
        for remote in self.fs.find(self.path(key)):
            target = dest / remote[len(self.path(key)) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(target))
        return dest

    # ---- completion markers -------------------------------------------------------------------
    @staticmethod
    def _marker(key: str) -> str:
        return f"_markers/{key}.json"

    def mark_done(self, key: str, **meta: Any) -> None:
        """Record that ``key`` is complete; call only after its data is fully written."""
        self.write_json(self._marker(key), {"key": key, "time": time.time(), **meta})

    def done(self, key: str, digest: str | None = None) -> bool:
        """Whether ``key`` is complete (and, given a digest, was made from the same inputs)."""
        try:
            meta = self.read_json(self._marker(key))
        except MissingArtifactError:
            return False
        return digest is None or meta.get("digest") == digest

    def clear_marker(self, key: str) -> None:
        if self.exists(self._marker(key)):
            self.fs.rm(self.path(self._marker(key)))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


def _jsonable(attrs: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(attrs, default=_json_default))
