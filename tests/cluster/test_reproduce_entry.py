"""jobs/reproduce.py without a cluster: its arguments, where it connects, and bad input (exit 2, no traceback)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dtrak_ray.errors import ConfigError
from dtrak_ray.pipeline import STAGES
from tests.conftest import tiny_config_dict

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "jobs" / "reproduce.py"


def _module():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # From another directory, as a job's driver runs from its working dir: the script finds the package itself.
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd="/", env=env)


def test_ray_address_prefers_the_flag_then_the_jobs_environment(monkeypatch):
    rp = _module()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert rp.ray_address(None) == "auto"
    assert rp.ray_address("local") is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what `ray job submit` sets for the driver
    assert rp.ray_address(None) == "10.0.0.5:6379"
    assert rp.ray_address("127.0.0.1:7000") == "127.0.0.1:7000"


def test_stages_are_checked_against_the_pipeline():
    rp = _module()
    assert rp.chosen_stages(None) is None
    assert rp.chosen_stages(" featurize, score ") == ["featurize", "score"]
    with pytest.raises(ConfigError, match="choose from " + ",".join(s.name for s in STAGES)):
        rp.chosen_stages("featurize,scroe")


def test_bad_config_exits_2_naming_the_field(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict("entry")))
    out = _run("--config", str(config), "--store", str(tmp_path / "store"), "--set", "lds.alpha=1.5")
    assert out.returncode == 2 and "lds.alpha" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = _run("--config", str(config), "--store", str(tmp_path / "store"), "--stages", "data,bogus")
    assert out.returncode == 2 and "unknown stage(s) ['bogus']" in out.stderr, out.stderr
    out = _run("--config", str(tmp_path / "missing.yaml"), "--store", str(tmp_path / "store"))
    assert out.returncode == 2 and "missing.yaml" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "store").exists()  # nothing written for a refused config


def test_help_and_missing_arguments():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    assert _run("--help", env=env).returncode == 0
    missing = _run("--config", "x.yaml", env=env)
    assert missing.returncode == 2 and "--store" in missing.stderr
