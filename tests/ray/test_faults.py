"""Faults survived, results identical to an undisturbed run.

(a) Transient object-store errors: the whole pipeline runs on s3:// through a real HTTP proxy in front
    of a real moto server; the proxy fails a seeded ~10% of the requests with HTTP 500 (half before
    forwarding them, half after: the request took effect but its answer is lost). The SDKs' own retries
    are switched off (botocore max_attempts=1; s3fs does not retry InternalError), so the store's own
    retry-with-backoff (dtrak_ray/store_retries.py) is what carries the run. Every array and the LDS numbers
    equal those of an undisturbed run on a local store.
(b) A partial write is never taken for a complete one: one feature shard's chunk truncated and one
    ground-truth chunk zeroed, their markers absent (as a crash between the write and its marker
    leaves them); the rerun recomputes exactly those, and the result is bit-identical.
(c) Provenance end to end: a stored features array whose attributes were tampered with is refused
    by ``dtrak-ray score``, naming the field.

Featurizer actor kills, driver kills and trainer kills are in test_pipeline_e2e.py,
test_driver_restart.py and test_train_resume.py.
"""

from __future__ import annotations

import errno
import http.client
import io
import json
import os
import random
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from rich.console import Console
from typer.testing import CliRunner

from dtrak_ray import store_retries
from dtrak_ray.cli import app
from dtrak_ray.config import parse_config
from dtrak_ray.errors import MissingArtifactError
from dtrak_ray.pipeline import run_pipeline
from dtrak_ray.storage import Store
from tests.conftest import tiny_config_dict
from tests.s3server import clear_s3fs_cache, start_moto

FAIL_RATE = 0.1


class FlakyProxy:
    """An HTTP proxy on loopback that fails a seeded fraction of requests with an S3 InternalError (500)."""

    def __init__(self, upstream: str, fail_rate: float, seed: int = 0):
        host, port = upstream.removeprefix("http://").split(":")
        self.fail_rate, self.rng, self.lock = fail_rate, random.Random(seed), threading.Lock()
        self.requests = self.injected_before = self.injected_after = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes: with Nagle's algorithm on, each answer would
            # wait for the client's delayed ACK (~40 ms a request, minutes over a run).
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline().strip():  # trailers, then the blank line
                        pass
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _fail(self) -> None:
                body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"
                self.send_response(500)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle_one(self) -> None:
                body = self._body()
                fault = proxy.decide()
                if fault == "before":
                    return self._fail()
                skip = {"transfer-encoding", "connection", "content-length", "expect", "keep-alive"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
                conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "after":  # the request took effect; its answer is lost
                    return self._fail()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in skip | {"server", "date"}:
                        self.send_header(k, v)
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def decide(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.rng.random() >= self.fail_rate:
                return None
            if self.rng.random() < 0.5:
                self.injected_before += 1
                return "before"
            self.injected_after += 1
            return "after"

    @property
    def injected(self) -> int:
        return self.injected_before + self.injected_after

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _config(name: str) -> dict:
    raw = tiny_config_dict(name)
    raw["data"].update(n_train=16, n_val=4)
    raw["generate"].update(n_samples=4, ddim_steps=2)
    raw["lds"].update(num_subsets=4)
    raw["features"].update(output_functions=["l_square"], K=[2], shard_size=8, micro_batch=8)
    raw["scoring"] = {"lambdas": [0.1, 10.0, 1000.0]}  # few lambdas: fewer score chunks, fewer requests
    raw["baselines"] = {"methods": []}
    raw["ensemble"] = {"sizes": []}
    return raw


@pytest.fixture(scope="module")
def flaky_s3():
    """moto behind a flaky proxy; the environment points there before Ray starts, so workers use it too."""
    url, stop_moto = start_moto(bucket="dtrak-flaky", prefix="runs")
    proxy = FlakyProxy(os.environ["AWS_ENDPOINT_URL"], FAIL_RATE, seed=8)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "DTRAK_STORAGE_OPTIONS", "DTRAK_STORE_RETRIES", "DTRAK_STORE_RETRY_BASE")}
    os.environ.update(
        AWS_ENDPOINT_URL=proxy.url,
        # The SDKs' own retries off: the store's retries must carry the run.
        DTRAK_STORAGE_OPTIONS=json.dumps({"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}),
        DTRAK_STORE_RETRIES="10",
        DTRAK_STORE_RETRY_BASE="0.02",
    )
    clear_s3fs_cache()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield url, proxy
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proxy.stop()
    stop_moto()


def _arrays(run) -> dict[str, np.ndarray]:
    """Every stored array of a run except the (run-name-free) images, keyed by store key."""
    found = {}
    for path in run.fs.find(run.root, withdirs=False):
        if path.endswith("/zarr.json"):
            key = path[len(run.root) + 1 : -len("/zarr.json")]
            meta = json.loads(run.fs.cat_file(path))
            if meta.get("node_type") == "array":
                found[key] = run.read_array(key)
    return found


def _lds(run) -> list[tuple]:
    return sorted((r["method"], r["test_set"], r["K"], r["lambda_selection"], r["lambda"], r["lds_mean"], r["lds_std"])
                  for r in run.read_json(run.SUMMARY)["lds"])


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three tiny pipeline runs, one of them on S3 through the proxy: minutes on a loaded machine
def test_transient_store_errors_partial_writes_and_provenance(flaky_s3, tmp_path: Path):
    s3_url, proxy = flaky_s3
    quiet = Console(file=io.StringIO())
    # The undisturbed reference, on a local store.
    local = tmp_path / "local"
    ref = run_pipeline(parse_config(_config("faults")), str(local), stages=None, console=quiet)
    ref_arrays, ref_lds = _arrays(ref), _lds(ref)
    assert any(k.startswith("features/") for k in ref_arrays) and any(k.startswith("scores/") for k in ref_arrays)

    # (a) The same run on s3:// through the flaky proxy.
    flaky = run_pipeline(parse_config(_config("faults")), s3_url, stages=None, console=quiet)
    _assert_same(ref_arrays, _arrays(Store(s3_url).run("faults")))  # these reads go through the proxy too
    assert _lds(flaky) == ref_lds
    print(f"\nflaky store: {proxy.requests} requests, {proxy.injected} faults injected ({proxy.injected_before} before forwarding, "
          f"{proxy.injected_after} after), all survived; {len(ref_arrays)} arrays and {len(ref_lds)} LDS records identical")
    assert proxy.injected >= 50 and proxy.injected_after >= 10

    # (b) A crash between a chunk write and its marker: data half-written, marker absent, stage not done.
    run = Store(str(local)).run("faults")
    feat = "features/base/train/l_square-K2-gaussian-k64.zarr"
    chunk = Path(run.path(f"{feat}/c/1/0"))
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # shard 1 (rows 8..15) cut mid-write
    run.clear_marker("features/base/train/l_square-gaussian-k64/shard-00001")
    outputs = run.open_array(run.outputs("val"), mode="r+")
    outputs[2, 0] = 0.0  # subset 2's ground truth: its chunk written with zeros, its marker lost
    run.clear_marker("lds/outputs/subset-002-seed-0")
    for stage in ("outputs", "featurize", "score", "evaluate", "report"):
        run.clear_marker(f"stages/{stage}")
    out = io.StringIO()
    run_pipeline(parse_config(_config("faults")), str(local), stages=None, console=Console(file=out, width=200))
    log = out.getvalue()
    assert "data: done earlier" in log.replace("- data", "data") and "train: done earlier" in log.replace("- train", "train")
    assert "featurized: reused" in log  # only the shard without a marker was computed again
    _assert_same(ref_arrays, _arrays(run))
    assert _lds(run) == ref_lds

    # (c) Provenance: the val features of a copy of the run claim another projector seed; `score` refuses.
    copy = tmp_path / "tampered"
    shutil.copytree(local, copy)
    meta_path = copy / "faults" / "features/base/val/l_square-K2-gaussian-k64.zarr/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["projector_seed"] = 1
    meta_path.write_text(json.dumps(meta))
    (copy / "faults" / "_markers/stages/score.json").unlink()
    config = tmp_path / "faults.yaml"
    config.write_text(yaml.safe_dump(_config("faults")))
    result = CliRunner().invoke(app, ["score", str(config), "--store", str(copy)], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "refusing to score" in text and "projector_seed: 0 (features/base/train/l_square-K2-gaussian-k64.zarr) vs 1" in text, text


# ---- the retry policy itself (no Ray, no server) --------------------------------------------------------
@pytest.mark.parametrize("exc, transient", [
    (OSError(errno.EIO, "Internal Server Error"), True),
    (OSError(errno.EREMOTEIO, "InternalError"), True),
    (OSError(errno.EBUSY, "SlowDown"), True),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (FileNotFoundError("no such key"), False),
    (PermissionError("AccessDenied"), False),
    (OSError(errno.ENOSPC, "disk full"), False),
    (OSError(errno.EINVAL, "bad request"), False),
    (MissingArtifactError("x"), False),
    (ValueError("bad chunk"), False),
])
def test_transient_errors_are_told_apart(exc: BaseException, transient: bool):
    assert store_retries.is_transient(exc) is transient


def test_retry_call_retries_transient_errors_a_bounded_number_of_times(monkeypatch, caplog):
    monkeypatch.setenv("DTRAK_STORE_RETRIES", "4")
    monkeypatch.setenv("DTRAK_STORE_RETRY_BASE", "0.001")
    calls = []

    def flaky(fails: int, exc: BaseException) -> str:
        calls.append(1)
        if len(calls) <= fails:
            raise exc
        return "ok"

    before = store_retries.retry_count
    assert store_retries.retry_call(flaky, 3, OSError(errno.EIO, "injected"), what="put x") == "ok"
    assert len(calls) == 4 and store_retries.retry_count - before == 3
    assert "transient OSError on put x (attempt 1 of 4)" in caplog.text
    calls.clear()
    with pytest.raises(OSError, match="injected"):  # still failing after 4 attempts: the error surfaces
        store_retries.retry_call(flaky, 10, OSError(errno.EIO, "injected"))
    assert len(calls) == 4
    calls.clear()
    with pytest.raises(FileNotFoundError):  # a missing key is an answer, not a fault: no retry
        store_retries.retry_call(flaky, 10, FileNotFoundError("k"))
    assert len(calls) == 1


def test_retrying_filesystem_on_a_local_store_is_transparent(tmp_path: Path):
    run = Store(str(tmp_path)).run("r")
    run.write_json("a/b.json", {"x": 1})
    assert run.read_json("a/b.json") == {"x": 1} and run.exists("a/b.json")
    assert run.fs.glob(run.path("a/*.json")) == [run.path("a/b.json")]
    run.write_array("arr.zarr", np.arange(6.0).reshape(2, 3), {"k": 3})
    np.testing.assert_array_equal(run.read_array("arr.zarr"), np.arange(6.0).reshape(2, 3))


def test_a_delete_whose_answer_was_lost_is_not_an_error(tmp_path: Path, monkeypatch):
    """The first DELETE removes the file but its answer is lost (EIO); the retry finds nothing: success."""
    monkeypatch.setenv("DTRAK_STORE_RETRY_BASE", "0.001")
    target = tmp_path / "old-checkpoint"
    target.write_bytes(b"x")
    answers = iter([OSError(errno.EIO, "answer lost")])

    def remove(path: Path) -> None:
        os.remove(path)  # raises FileNotFoundError on the retry
        if (exc := next(answers, None)) is not None:
            raise exc

    assert store_retries.retry_call(remove, target, deletes=True) is None and not target.exists()
    with pytest.raises(FileNotFoundError):  # without a lost answer, a missing file is still an error
        store_retries.retry_call(remove, target, deletes=True)
