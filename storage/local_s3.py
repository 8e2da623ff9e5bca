"""A local S3-compatible server for development: moto's server, on loopback, in this process.

    python storage/local_s3.py --port 9000 --bucket dtrak

prints the environment to export, then serves until Ctrl-C. Point dtrak-ray at it with
``--store s3://dtrak/runs``. Data lives in memory and is gone when the server stops.
"""

from __future__ import annotations

import argparse
import signal
import threading

import boto3
from moto.server import ThreadedMotoServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--bucket", default="dtrak")
    args = parser.parse_args()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port)
    server.start()
    endpoint = f"http://127.0.0.1:{args.port}"
    # moto accepts any credentials; these are placeholders, not secrets.
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="dev", aws_secret_access_key="dev", region_name="us-east-1")
    s3.create_bucket(Bucket=args.bucket)  # no location constraint: moto refuses us-east-1 with one
    print(f"export AWS_ENDPOINT_URL={endpoint} AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev AWS_DEFAULT_REGION=us-east-1")
    print(f"store: s3://{args.bucket}/runs   (Ctrl-C stops the server)")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
