"""The store: every path, array, model directory and completion marker of a run lives here.

A store is a URL, a local directory or ``s3://bucket/prefix`` (any fsspec URL works), plus storage
options. Nothing else in dtrak-ray builds a path string: stages ask a :class:`RunStore` for the
key of what they read or write.

Layout of one run (keys relative to ``{store}/{run}/``)::

    config.yaml                                   the config that made the run (every field)
    data/indices.zarr/{train,val,labels,masks}    split indices, labels, LDS subset masks (M x N)
    models/base/seed-{s}/                         diffusers save_pretrained of the base model
    models/lds/subset-{m}/seed-{s}/               LDS subset models
    models/counterfactual/{method}/image-{i}/     models retrained without an image's top-k (counterfactual)
    checkpoints/{model key}/epoch-{e}/            training checkpoints (diffusers dir + train_state.pt)
    counterfactual/regenerated.zarr               counterfactual regenerations (n, methods, C, H, W)
    samples/gen.zarr                              the Gen test set (n, C, H, W)
    lds/outputs-{set}.zarr                        ground truth (M, seeds, noise seeds, n_test)
    features/{model}/{set}/{f}-K{K}-{proj}-k{k}.zarr      projected gradients (n, k)
    scores/{model}/{set}/{f}-K{K}-{proj}-k{k}.zarr        scores for every lambda (L, n_test, N)
    scores/{model}/{set}/{name}.zarr, ...-top.zarr        baseline/ensemble scores; top-k train indices beside any scores
    scores/index/{stage}.json                     the scores arrays a stage wrote (read by evaluate)
    kernel/{model}/{f}-K{K}-{proj}-k{k}.zarr      factorized Gram matrix (eigvals, eigvecs; form in attributes)
    models/ensemble/member-{j}/                   ensemble members (data/ensemble.zarr/masks: their subsets)
    results/summary.json, results/lds.json        LDS records
    results/sweep.json, report/sweep.{md,png}     the Ray Tune sweep (sweep/tune: Tune's experiment folder)
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

from dtrak_ray.errors import CorruptArtifactError, MissingArtifactError, StoreError
from dtrak_ray.store_retries import RetryingFileSystem, RetryingZarrStore, is_transient, retry_call
from dtrak_ray.store_retries import short as _short

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
            fs, self.root = fsspec.core.url_to_fs(self.url, **({} if self.is_local else self.storage_options))
            self.fs = RetryingFileSystem(fs)
            if self.is_local:
                self.root = str(Path(self.root).resolve())
                self.fs.makedirs(self.root, exist_ok=True)
            else:
                bucket = self.root.split("/", 1)[0]
                # Fails fast on a missing bucket or bad credentials; an endpoint that refuses twice is down.
                retry_call(fs.ls, bucket, refresh=True, what=f"ls {bucket}", attempts=2)
        except PermissionError as exc:
            raise StoreError(
                f"store {self.url!r} refused access ({_short(exc)}): check the credentials in the environment "
                "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the instance role) and that they may use this bucket"
            ) from None
        except FileNotFoundError as exc:
            raise StoreError(
                f"store {self.url!r}: {'bucket' if not self.is_local else 'path'} not found ({_short(exc)}): "
                "create it first or fix the URL"
            ) from None
        except Exception as exc:  # noqa: BLE001 - any other backend error means the same thing to the user
            endpoint = (self.storage_options.get("client_kwargs") or {}).get("endpoint_url")
            raise StoreError(
                f"store {self.url!r} cannot be reached ({type(exc).__name__}: {_short(exc)}); "
                f"check the URL{f', the endpoint {endpoint} (AWS_ENDPOINT_URL)' if endpoint else ''}, that the bucket exists, "
                "and the credentials in the environment"
            ) from None

    def run(self, name: str) -> RunStore:
        """The part of the store that belongs to run ``name``."""
        return RunStore(self, name)

    def __getstate__(self) -> dict[str, Any]:
        # Ray ships stores to workers: send the URL, rebuild the filesystem there.
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]


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

    # Scoring at scale (stages score, baselines, ensemble): the factorized Gram matrix of a model's
    # train features, any method's scores (L, n_test, N), the top-k train indices beside each scores
    # array, and the index of every scores array a stage wrote (the evaluate stage reads the indexes).
    @staticmethod
    def kernel(model: str, f: str, K: int, projector: str, k: int) -> str:
        return f"kernel/{model}/{f}-K{K}-{projector}-k{k}.zarr"

    @staticmethod
    def method_scores(model: str, test_set: str, name: str) -> str:
        return f"scores/{model}/{test_set}/{name}.zarr"

    @staticmethod
    def top_of(scores_key: str) -> str:
        """Key of the top-k train indices stored beside a scores array."""
        return scores_key.removesuffix(".zarr") + "-top.zarr"

    @staticmethod
    def score_index(stage: str) -> str:
        return f"scores/index/{stage}.json"

    @staticmethod
    def ensemble_model(member: int) -> str:
        return f"models/ensemble/member-{member:02d}"

    ENSEMBLE_MASKS = "data/ensemble.zarr/masks"

    @staticmethod
    def baseline_predictions(test_set: str, method: str) -> str:
        """Cross-fitted LDS predictions (M, n_test) of a baseline fitted on the LDS subsets themselves."""
        return f"baselines/{test_set}/{method}-predictions.zarr"

    @staticmethod
    def report_file(name: str) -> str:
        return f"report/{name}"

    # The Ray Tune sweep (dtrak_ray/sweep/): results, Tune's own experiment folder, and the markers
    # of features it computes itself (kept apart from the featurize stage's shard markers).
    SWEEP = "results/sweep.json"
    SWEEP_TUNE = "sweep/tune"

    @staticmethod
    def sweep_shard(split: str, f: str, Ks: tuple[int, ...], projector: str, k: int, index: int) -> str:
        return f"sweep/features/{split}/{f}-K{'+'.join(map(str, Ks))}-{projector}-k{k}/shard-{index:05d}"

    def feature_dims(self, model: str, split: str, f: str, K: int, projector: str) -> list[int]:
        """The k of every stored features array of (model, split, f, K, projector), ascending."""
        pattern = self.path(self.features(model, split, f, K, projector, 0)).removesuffix("0.zarr") + "*.zarr"
        found = [p.rstrip("/").rsplit("-k", 1)[-1].removesuffix(".zarr") for p in self.fs.glob(pattern)]
        return sorted(int(k) for k in found if k.isdigit())

    def local_path(self, key: str = "") -> str | None:
        """Absolute local path of a key on a local store (for tools that need one, like Ray Tune); None on S3."""
        return self.path(key) if self.store.is_local else None

    # Training checkpoints: ``checkpoints/{model key}/epoch-{e}/`` holds the model as a plain diffusers
    # directory (``UNet2DModel.from_pretrained`` loads it) plus ``train_state.pt`` (optimizer, LR
    # scheduler, step, losses) for resuming. The base model keeps every checkpoint (evenly spaced
    # epochs, for TracIn-style baselines); subset and counterfactual models keep only their latest.
    TRAIN_STATE = "train_state.pt"
    COUNTERFACTUAL = "results/counterfactual.json"
    COUNTERFACTUAL_IMAGES = "counterfactual/regenerated.zarr"

    @staticmethod
    def checkpoint(model_key: str, epoch: int) -> str:
        return f"checkpoints/{model_key}/epoch-{epoch:05d}"

    def checkpoints(self, model_key: str, digest: str | None = None) -> list[tuple[int, str]]:
        """Complete checkpoints of a model, ``[(epoch, key), ...]`` by epoch (markers vouch for them)."""
        pattern = self.path(self._marker(f"checkpoints/{model_key}/epoch-*"))
        out = []
        for marker in self.fs.glob(pattern):
            name = marker.rsplit("/", 1)[-1].removesuffix(".json")
            key = f"checkpoints/{model_key}/{name}"
            if digest is None or self.done(key, digest):
                out.append((int(name.removeprefix("epoch-")), key))
        return sorted(out)

    def base_checkpoints(self, seed: int = 0) -> list[tuple[int, str]]:
        """Intermediate checkpoints of the base model, ``[(epoch, key)]``; ``load_model(run, key)`` loads one."""
        return self.checkpoints(self.base_model(seed))

    @staticmethod
    def counterfactual_model(method: str, image: int) -> str:
        return f"models/counterfactual/{method}/image-{image:04d}"

    def delete(self, key: str) -> None:
        """Remove a key's marker, then its data (a file or a directory); a missing key is fine."""
        self.clear_marker(key)
        if self.exists(key):
            self.fs.rm(self.path(key), recursive=True)

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
            retry_call(_write_local_atomic, path, data, what=f"write {key}")
        else:
            self.fs.pipe_file(path, data)  # one PUT: atomic on S3, retried as a whole

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(key))
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
            return RetryingZarrStore(zarr.storage.LocalStore(self.path(key)))
        return RetryingZarrStore(
            zarr.storage.FsspecStore.from_url(f"{self.store.url}/{self.name}/{key}", storage_options=self.store.storage_options)
        )

    def _corrupt(self, key: str, exc: BaseException) -> CorruptArtifactError:
        return CorruptArtifactError(
            f"array {self.url(key)} exists but cannot be read ({type(exc).__name__}: {_short(exc)}): it was truncated or "
            "overwritten outside dtrak-ray. Delete it and the stage marker of the stage that wrote it (under "
            f"{self.url('_markers/stages')}/), then rerun that stage; or start a new run with --set name=NEW"
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
        except (ValueError, TypeError, KeyError, zarr.errors.BaseZarrError) as exc:  # unreadable zarr.json
            raise self._corrupt(key, exc) from None

    def write_array(self, key: str, data: np.ndarray, attrs: dict[str, Any], chunks: tuple[int, ...] | None = None) -> None:
        """Write a whole array at once (small arrays)."""
        arr = self.create_array(key, data.shape, chunks or data.shape, str(data.dtype), attrs)
        arr[...] = data

    def read_array(self, key: str) -> np.ndarray:
        arr = self.open_array(key)
        try:
            return np.asarray(arr[...])
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as exc:
            # A chunk that does not decode (truncated, garbled) or decodes to the wrong size.
            if is_transient(exc):
                raise
            raise self._corrupt(key, exc) from None

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

    def marker(self, key: str) -> dict[str, Any] | None:
        """The record a completion marker holds (what ``mark_done`` was given), or None if ``key`` is not done."""
        try:
            return self.read_json(self._marker(key))
        except MissingArtifactError:
            return None

    def clear_marker(self, key: str) -> None:
        if self.exists(self._marker(key)):
            self.fs.rm(self.path(self._marker(key)))


def _write_local_atomic(path: str, data: bytes) -> None:
    # A temporary file then a rename: a reader never sees half a file, a crash leaves only a .tmp-*.
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: keep a shared store readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
