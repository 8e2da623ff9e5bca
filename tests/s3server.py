"""An in-process moto S3 server for tests that exercise the store against ``s3://``.

Use :func:`moto_s3` as a context manager, or :func:`start_moto` from a (module-scoped) fixture::

    @pytest.fixture(scope="module")
    def s3_url():
        url, stop = start_moto()
        yield url
        stop()

While the server runs, ``os.environ`` holds fake credentials and ``AWS_ENDPOINT_URL`` pointing at
it (so ``storage_options_from_env()`` finds it); stopping restores the previous environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

FAKE_ACCESS_KEY = "AKIAFAKEDTRAKTEST0001"
FAKE_SECRET_KEY = "dtrak-fake-secret-Zq8vN3xKp2LmW7rT"
_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
             "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "DTRAK_STORAGE_OPTIONS")


def clear_s3fs_cache() -> None:
    """Forget cached s3fs filesystem instances so a new endpoint/credential set is honoured."""
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:  # pragma: no cover - s3fs is a test dependency
        pass


def start_moto(bucket: str = "dtrak-test", prefix: str = "prefix") -> tuple[str, Callable[[], None]]:
    """Start moto on a free loopback port, set fake AWS env vars, create ``bucket``.

    Returns ``(url, stop)``: ``url`` is ``s3://{bucket}/{prefix}``; ``stop()`` shuts the server
    down and restores the environment (idempotent).
    """
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: OS picks
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"

    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    for k in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_REGION", "DTRAK_STORAGE_OPTIONS"):
        os.environ.pop(k, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID=FAKE_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=FAKE_SECRET_KEY,
        AWS_ENDPOINT_URL=endpoint,
        AWS_DEFAULT_REGION="us-east-1",
    )
    clear_s3fs_cache()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        try:
            server.stop()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            clear_s3fs_cache()

    try:
        # No CreateBucketConfiguration: us-east-1 takes no location constraint.
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    except BaseException:
        stop()
        raise
    return f"s3://{bucket}/{prefix}", stop


@contextmanager
def moto_s3(bucket: str = "dtrak-test", prefix: str = "prefix") -> Iterator[str]:
    """Context manager around :func:`start_moto`; yields ``s3://{bucket}/{prefix}``."""
    url, stop = start_moto(bucket, prefix)
    try:
        yield url
    finally:
        stop()


def all_objects(bucket: str = "dtrak-test") -> dict[str, bytes]:
    """Every object in ``bucket`` (key -> bytes), read with boto3 from the current endpoint."""
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out
