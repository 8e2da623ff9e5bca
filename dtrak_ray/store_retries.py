"""Retries of transient object-store errors, around the store's filesystem and its Zarr stores.

The store (:mod:`dtrak_ray.storage`) wraps every filesystem it opens in :class:`RetryingFileSystem`
and every Zarr array's store in :class:`RetryingZarrStore`; :func:`retry_call` is the policy.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import time
from typing import Any

import zarr

from dtrak_ray.errors import DtrakError


def short(exc: BaseException) -> str:
    """The first line of an error, at most 200 characters (for messages and logs)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]


# ---- retries of transient store errors ----------------------------------------------------------
# Object stores fail a small fraction of requests (5xx, throttling, dropped connections); a job that
# runs for days must ride them out. Every call to the store's filesystem and every Zarr store request
# is retried with exponential backoff and jitter, a bounded number of times, and only for errors
# that can pass: a missing key, a refused permission or a bad argument fails at once. Each retry is
# logged (type and first line of the error; never the storage options, which may hold credentials).
# DTRAK_STORE_RETRIES (attempts, default 6) and DTRAK_STORE_RETRY_BASE (first delay in seconds,
# default 0.1) tune it; every attempt is idempotent (a PUT of the same bytes, a GET, a DELETE).
_log = logging.getLogger("dtrak_ray.storage")
_TRANSIENT_ERRNOS = {
    errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
    errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ESTALE, getattr(errno, "EREMOTEIO", 121),
}
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
# Connection-level errors of the HTTP stacks under s3fs that are not OSErrors (matched by name to
# avoid importing botocore and aiohttp on local stores).
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError", "ProxyConnectionError",
    "ResponseStreamingError", "IncompleteReadError", "ServerDisconnectedError", "ClientPayloadError", "ClientConnectionError",
    "ClientOSError", "FSTimeoutError", "IncompleteRead", "ResponseParserError",
}
retry_count = 0  # retries done in this process (tests and logs report it)


def is_transient(exc: BaseException) -> bool:
    """Whether a store error may pass if the request is repeated (and so is worth a retry)."""
    if isinstance(exc, (DtrakError, *_PERMANENT_OS_ERRORS)):
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS or exc.errno is None and "timeout" in str(exc).lower()
    return False


def _retry_settings() -> tuple[int, float]:
    return max(1, int(os.environ.get("DTRAK_STORE_RETRIES", "6"))), float(os.environ.get("DTRAK_STORE_RETRY_BASE", "0.1"))


def _backoff(attempt: int, base: float) -> float:
    # Full jitter: workers that failed together do not retry together.
    return random.uniform(0.5, 1.0) * min(base * 2**attempt, 10.0)


def _note_retry(what: str, exc: BaseException, attempt: int, attempts: int, delay: float) -> None:
    global retry_count
    retry_count += 1
    _log.warning("store: transient %s on %s (attempt %d of %d): %s; retrying in %.2f s", type(exc).__name__, what, attempt + 1,
                 attempts, short(exc), delay)


def retry_call(fn: Any, *args: Any, what: str = "", attempts: int | None = None, deletes: bool = False, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, repeated with exponential backoff while it fails with a transient error.

    ``deletes``: ``fn`` removes something, so a FileNotFoundError on a retry means an earlier attempt
    did remove it (its answer was lost): that is success, not an error.
    """
    n, base = _retry_settings()
    n = attempts or n
    for attempt in range(n):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if deletes and attempt > 0 and isinstance(exc, FileNotFoundError):
                return None
            if attempt == n - 1 or not is_transient(exc):
                raise
            delay = _backoff(attempt, base)
            _note_retry(what or getattr(fn, "__name__", "store call"), exc, attempt, n, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class RetryingFileSystem:
    """An fsspec filesystem whose methods are retried on transient errors (see :func:`retry_call`).

    Attribute access passes through, so it is used like the filesystem it wraps; ``open`` is not
    retried (a half-written file object cannot be replayed): whole-file reads and writes go through
    ``cat_file`` and ``pipe_file``.
    """

    _NOT_RETRIED = {"open"}
    _DELETES = {"rm", "rm_file", "rmdir", "delete", "_rm"}

    def __init__(self, fs: Any):
        self._fs = fs

    def __getstate__(self) -> dict[str, Any]:
        return {"fs": self._fs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._fs = state["fs"]

    def __getattr__(self, name: str) -> Any:
        if name == "_fs":  # not set yet (while unpickling): no recursion through __getattr__
            raise AttributeError(name)
        attr = getattr(self._fs, name)
        if name.startswith("_") or name in self._NOT_RETRIED or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return retry_call(attr, *args, what=f"{name} {args[0] if args else ''}".strip(), deletes=name in self._DELETES, **kwargs)

        return call


class RetryingZarrStore(zarr.storage.WrapperStore):
    """A Zarr store whose requests are retried on transient errors, with the same policy."""

    async def _retry(self, what: str, fn: Any, *args: Any) -> Any:
        n, base = _retry_settings()
        for attempt in range(n):
            try:
                return await fn(*args)
            except Exception as exc:
                if what.startswith("delete") and attempt > 0 and isinstance(exc, FileNotFoundError):
                    return None  # an earlier attempt removed it; its answer was lost
                if attempt == n - 1 or not is_transient(exc):
                    raise
                delay = _backoff(attempt, base)
                _note_retry(f"{what} {args[0] if args and isinstance(args[0], str) else ''}".strip(), exc, attempt, n, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return await self._retry("get", self._store.get, key, prototype, byte_range)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        return await self._retry("get_partial_values", self._store.get_partial_values, prototype, list(key_ranges))

    async def exists(self, key: str) -> bool:
        return await self._retry("exists", self._store.exists, key)

    async def set(self, key: str, value: Any) -> None:
        await self._retry("set", self._store.set, key, value)

    async def set_if_not_exists(self, key: str, value: Any) -> None:
        await self._retry("set_if_not_exists", self._store.set_if_not_exists, key, value)

    async def _set_many(self, values: Any) -> None:
        await asyncio.gather(*(self.set(k, v) for k, v in values))

    async def _get_many(self, requests: Any) -> Any:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def delete(self, key: str) -> None:
        await self._retry("delete", self._store.delete, key)

    async def delete_dir(self, prefix: str) -> None:
        await self._retry("delete_dir", self._store.delete_dir, prefix)

    async def _listed(self, what: str, make: Any, *args: Any) -> Any:
        async def collect() -> list[str]:
            return [k async for k in make(*args)]

        for key in await self._retry(what, collect):
            yield key

    def list(self) -> Any:
        return self._listed("list", self._store.list)

    def list_prefix(self, prefix: str) -> Any:
        return self._listed("list_prefix", self._store.list_prefix, prefix)

    def list_dir(self, prefix: str) -> Any:
        return self._listed("list_dir", self._store.list_dir, prefix)
