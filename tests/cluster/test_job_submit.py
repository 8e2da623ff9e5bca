"""A reproduction is one `ray job submit`: submitted to a real local head, resumed when resubmitted.

The head runs in a session of its own (``tests/cluster/head.py``) with token authentication on and
its dashboard (the job server) on 127.0.0.1; the job ships the repository as its working dir with
the excludes and env vars of ``cluster/runtime_env.yaml`` (not its pip list: the head already runs
this virtualenv, and the job's driver uses the head's Python).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dtrak_ray.pipeline import STAGES
from dtrak_ray.storage import Store
from tests.cluster.head import start_head
from tests.conftest import tiny_config_dict

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def head():
    h = start_head(num_cpus=2)
    yield h
    h.stop()


def _runtime_env() -> dict:
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    env.pop("pip")
    env["working_dir"] = str(REPO)
    return env


def _wait(client, sid: str, timeout: float = 480) -> None:
    deadline = time.time() + timeout
    while str(client.get_job_status(sid)) not in TERMINAL:
        assert time.time() < deadline, f"job {sid} still running after {timeout} s:\n{client.get_job_logs(sid)[-3000:]}"
        time.sleep(1)


def _markers(store: Path) -> dict[str, float]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in store.glob("*/_markers/**/*.json")}


@pytest.mark.timeout(1200)  # about a minute alone; minutes on a loaded machine
def test_job_submit_runs_the_pipeline_and_a_resubmission_resumes(head, tmp_path: Path):
    from ray.job_submission import JobSubmissionClient

    config = tmp_path / "tiny.yaml"
    raw = tiny_config_dict("jobtiny")
    # Smaller still: the point is the job's plumbing; every stage still runs, for TRAK and D-TRAK.
    raw["lds"]["num_subsets"], raw["features"]["K"] = 4, [2]
    config.write_text(yaml.safe_dump(raw))
    store = tmp_path / "store"
    entry = ["python", "jobs/reproduce.py", "--config", str(config), "--store", str(store)]

    # 1. The way a user submits: the `ray job submit` CLI, which waits and streams the driver's log.
    submit = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", head.dashboard_url,
         "--submission-id", "dtrak-first", "--runtime-env-json", json.dumps(_runtime_env()), "--", *entry],
        capture_output=True, text=True, timeout=600, env=head.env, cwd=REPO,
    )  # fmt: skip
    log = submit.stdout + submit.stderr
    client = JobSubmissionClient(head.dashboard_url, headers=head.auth_headers)
    info = client.get_job_info("dtrak-first")
    # `ray job status` exits 0 even for a FAILED job: the driver's own exit code is the one to read.
    assert (submit.returncode, str(info.status), info.driver_exit_code) == (0, "SUCCEEDED", 0), log[-4000:]
    for stage in STAGES:
        assert f"- {stage.name}: {stage.help}" in log, f"stage {stage.name} not logged:\n{log[-3000:]}"
    run = Store(str(store)).run("jobtiny")
    summary = run.read_json(run.SUMMARY)
    assert {r["method"] for r in summary["lds"]} >= {"TRAK", "D-TRAK"}
    assert "LDS (%)" in log and "job: done in" in log
    before = _markers(store)
    assert len(before) > len(STAGES)  # stage markers plus each model's and shard's

    # 2. Resubmitted (through the SDK this time): every stage is reused and nothing is rewritten.
    sid = client.submit_job(entrypoint=" ".join(entry), runtime_env=_runtime_env(), submission_id="dtrak-again")
    _wait(client, sid)
    again = client.get_job_logs(sid)
    info = client.get_job_info(sid)
    assert (str(info.status), info.driver_exit_code) == ("SUCCEEDED", 0), again[-4000:]
    for stage in STAGES:
        assert f"- {stage.name}: done earlier, reused" in again, again[-3000:]
    assert _markers(store) == before
    assert run.read_json(run.SUMMARY) == summary

    # 3. Bad input fails the job with the driver's exit code 2 and a message naming the field.
    bad = client.submit_job(entrypoint=" ".join(entry + ["--set", "lds.alpha=1.5"]), runtime_env=_runtime_env())
    _wait(client, bad)
    info = client.get_job_info(bad)
    logs = client.get_job_logs(bad)
    assert (str(info.status), info.driver_exit_code) == ("FAILED", 2), logs[-3000:]
    assert "lds.alpha" in logs and "Traceback" not in logs


def test_token_authentication_is_on(head):
    """The job server refuses a request without the token (the head was started with RAY_AUTH_MODE=token)."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as no_token:
        urllib.request.urlopen(f"{head.dashboard_url}/api/jobs/", timeout=10)
    assert no_token.value.code in (401, 403)
    req = urllib.request.Request(f"{head.dashboard_url}/api/jobs/", headers=head.auth_headers)
    with urllib.request.urlopen(req, timeout=10) as ok:
        assert ok.status == 200
    assert os.environ.get("RAY_AUTH_TOKEN_PATH") != head.env["RAY_AUTH_TOKEN_PATH"]  # the test process's env is untouched
