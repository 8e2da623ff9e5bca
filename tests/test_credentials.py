"""The whole pipeline on s3://, credentials never leak, and no dashboard listens beyond loopback.

A whole tiny pipeline runs through the real CLI (a subprocess, its own local Ray instance with its
temp dir under our control) against a real moto S3 server on loopback, with distinctive AWS
credentials in the environment. Its store is in the bucket end to end: models, features, scores,
results and report are objects there, nothing is written to the working directory, and a second
run finds every stage done in the bucket and reuses it. Every object in the bucket, every file of
the Ray session (logs, runtime env, job info) and the driver's stdout and stderr are scanned for the
key id and the secret, in clear and in base64: none may appear. While the run is live, the
listening sockets of every process it started are recorded: none that belongs to the dashboard
listens beyond loopback. (The same pipeline on s3:// through a flaky proxy, with results equal to
a local run, is in tests/ray/test_faults.py.)
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import tiny_config_dict
from tests.s3server import all_objects, start_moto

pytestmark = pytest.mark.slow

KEY_ID = "AKIADTRAKLEAKCHECK7Q"
SECRET = "dtrak/Leak+Check-Vq93LmZx0PpR2sTkW8yN"


def _needles() -> dict[str, bytes]:
    out = {}
    for name, value in (("key id", KEY_ID), ("secret", SECRET)):
        raw = value.encode()
        out[name] = raw
        out[f"{name} (base64)"] = base64.b64encode(raw)
        out[f"{name} (urlsafe base64)"] = base64.urlsafe_b64encode(raw)
    out["key id:secret (base64)"] = base64.b64encode(f"{KEY_ID}:{SECRET}".encode())
    return out


def _listeners(root: psutil.Process) -> set[tuple[int, str, str, int]]:
    """(pid, short command line, address, port) of every listening socket of ``root`` and its descendants."""
    found = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for proc in procs:
        try:
            cmd = " ".join(proc.cmdline())[:160]
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((proc.pid, cmd, conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue
    return found


def _speaks_http(ip: str, port: int) -> bool:
    """Whether something answers plain HTTP/1 on (ip, port): the dashboard and metrics servers do, gRPC does not."""
    host = "127.0.0.1" if ipaddress.ip_address(ip).is_unspecified else ip
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def test_no_credentials_in_store_logs_or_report_and_dashboard_on_loopback(tmp_path: Path):
    url, stop = start_moto(bucket="dtrak-creds", prefix="runs")
    ray_tmp = Path(tempfile.mkdtemp(prefix="dtrk-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        raw = tiny_config_dict("creds")
        raw["data"].update(n_train=16, n_val=4)
        raw["generate"].update(n_samples=4, ddim_steps=2)
        raw["lds"].update(num_subsets=4)
        raw["features"].update(K=[2], shard_size=8)
        raw["baselines"] = {"methods": []}
        raw["ensemble"] = {"sizes": []}
        config = tmp_path / "creds.yaml"
        config.write_text(yaml.safe_dump(raw))
        env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "RAY_TMPDIR": str(ray_tmp), "COLUMNS": "200"}
        env.pop("RAY_ADDRESS", None)
        stdout, stderr = tmp_path / "driver.out", tmp_path / "driver.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "dtrak_ray.cli", "run", str(config), "--store", url, "--yes", "--no-paper"],
                                    stdout=out, stderr=err, env=env, cwd=tmp_path)
            listening: set[tuple[int, str, str, int]] = set()
            http_exposed: list[tuple[int, str, str, int]] = []
            root = psutil.Process(proc.pid)
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:
                new = _listeners(root) - listening
                listening |= new
                # Anything of the dashboard reachable beyond loopback must not serve HTTP (its web UI,
                # its API or its metrics); Ray's gRPC ports are token-authenticated.
                http_exposed += [s for s in new if "dashboard" in s[1].lower() and not ipaddress.ip_address(s[2]).is_loopback
                                 and _speaks_http(s[2], s[3])]
                time.sleep(0.5)
            if proc.poll() is None:
                proc.kill()
        driver = stdout.read_bytes() + stderr.read_bytes()
        assert proc.returncode == 0, driver.decode(errors="replace")[-4000:]

        objects = all_objects("dtrak-creds")
        assert any(k.endswith("report/report.md") for k in objects) and any(k.endswith("results/summary.json") for k in objects)
        for part in ("models/base/seed-0/diffusion_pytorch_model.safetensors", "features/base/train/l_square-K2-gaussian-k64.zarr/zarr.json",
                     "scores/base/val/l_square-K2-gaussian-k64.zarr/zarr.json", "_markers/stages/report.json"):
            assert any(k.startswith("runs/creds/") and k.endswith(part) for k in objects), part
        assert sorted(p.name for p in tmp_path.iterdir()) == ["creds.yaml", "driver.err", "driver.out"]  # nothing written locally
        sessions = [p for p in ray_tmp.rglob("session_*") if p.is_dir() and not p.is_symlink()]
        ray_files = [p for s in sessions for p in s.rglob("*") if p.is_file() and not p.is_socket()]
        assert any(p.suffix in (".out", ".err", ".log") for p in ray_files), "no Ray session logs found"
        leaks = []
        for name, needle in _needles().items():
            leaks += [f"{name} in s3 object {k}" for k, body in objects.items() if needle in body]
            leaks += [f"{name} in Ray file {p}" for p in ray_files if needle in p.read_bytes()]
            if needle in driver:
                leaks.append(f"{name} in the driver's output")
        print(f"\nscanned {len(objects)} objects, {len(ray_files)} Ray session files, {len(driver)} bytes of driver output: "
              f"{len(leaks)} leaks")
        assert not leaks, leaks

        # A second run finds every stage done in the bucket and reuses it.
        again = subprocess.run([sys.executable, "-m", "dtrak_ray.cli", "run", str(config), "--store", url, "--yes", "--no-paper"],
                               capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        from dtrak_ray.pipeline import STAGES

        assert again.stdout.count("done earlier, reused") == len(STAGES), again.stdout
        assert KEY_ID not in again.stdout + again.stderr and SECRET not in again.stdout + again.stderr

        # The dashboard is off for a local instance; what runs of it (its agent) serves no HTTP beyond loopback.
        assert any("dashboard" in s[1].lower() for s in listening), "the dashboard agent's sockets were not seen"
        print(f"listening while live: {sorted({(s[2], s[3], s[1].split()[0].rsplit('/', 1)[-1]) for s in listening})}")
        assert not http_exposed, f"dashboard HTTP beyond loopback: {http_exposed}"
        assert not any(s[3] == 8265 for s in listening), "the dashboard's web server is running"
    finally:
        stop()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
