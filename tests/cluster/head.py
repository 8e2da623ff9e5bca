"""A real Ray head for the cluster tests: `ray start --head --block` in a session of its own, on loopback.

Why not ``ray.init`` or ``ray.cluster_utils``: the job server lives in the dashboard of a head started
by ``ray start``, and ``AutoscalingCluster`` runs ``ray stop --force``, which would stop every Ray
instance on a shared machine. This head is stopped by its own process group, and any process still
holding its private temp dir (fake autoscaled nodes, job drivers) is then stopped by PID.

Token authentication stays on, as on a real cluster: a fresh token in a file of the test's own
(``RAY_AUTH_TOKEN_PATH``), ``RAY_AUTH_MODE=token`` for the head and for every client it gives ``env``.
Every port is chosen free, so several heads (other tests, other users) can run side by side.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    """A running head: where to reach it, the environment a client needs, and how to stop it."""

    proc: subprocess.Popen
    temp_dir: Path
    gcs_address: str
    dashboard_url: str
    token: str
    env: dict[str, str] = field(repr=False)
    log: Path = field(repr=False)

    @property
    def auth_headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard (the job server) under token authentication."""
        return {"Authorization": f"Bearer {self.token}"}

    def processes(self) -> list[psutil.Process]:
        """Processes that belong to this head: its own process group, or its private temp dir on the command line."""
        mine = []
        tag = str(self.temp_dir)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid == os.getpid():
                    continue
                if os.getpgid(p.pid) == self.proc.pid or any(tag in a for a in (p.info["cmdline"] or [])):
                    mine.append(p)
            except (psutil.Error, ProcessLookupError):
                continue
        return mine

    def stop(self) -> None:
        """SIGTERM ``ray start --block`` (it drains and stops what it started: faster and cleaner than
        signalling the whole group at once), then SIGKILL whatever of this head is left, by PID."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        deadline = time.time() + 5
        left = self.processes()
        while left and time.time() < deadline:
            time.sleep(0.5)
            left = self.processes()
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(
    *,
    num_cpus: int = 2,
    num_gpus: int = 0,
    port: int | None = None,
    extra_args: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 180,
) -> Head:
    """Start a head and wait until its dashboard answers an authenticated request.

    ``port`` fixes the GCS port (an autoscaling config written beforehand names it); default: a free one.
    """
    # A short private temp dir: Unix socket paths under it must stay under 108 bytes, and a fresh
    # directory holds no stale ray_current_cluster file from an earlier head.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    gcs_port, dash_port = port or free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_USAGE_STATS_ENABLED="0",
        # The job driver runs `python ...` from the raylet's PATH: make it this test's interpreter.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.update(extra_env or {})
    cmd = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        "--port", str(gcs_port),
        "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
        "--temp-dir", str(temp_dir),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
        "--dashboard-agent-listen-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
        *(extra_args or []),
    ]  # fmt: skip
    log = temp_dir / "head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = Head(proc, temp_dir, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", token, env, log)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            text = log.read_text()
            head.stop()
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{text[-3000:]}")
        try:
            req = urllib.request.Request(f"{head.dashboard_url}/api/version", headers=head.auth_headers)
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return head
        except OSError:
            pass
        if time.time() > deadline:
            text = log.read_text()
            head.stop()
            raise RuntimeError(f"the Ray head did not come up within {timeout} s:\n{text[-3000:]}")
        time.sleep(0.5)
