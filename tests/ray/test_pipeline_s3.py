"""The whole pipeline with its store on s3:// against a real S3-compatible server on loopback."""

from __future__ import annotations

import io

import pytest
import ray
from rich.console import Console

from dtrak_ray.config import parse_config
from dtrak_ray.pipeline import STAGES, run_pipeline
from tests.conftest import tiny_config_dict
from tests.s3server import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, all_objects, start_moto

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_ray():
    """moto first, then Ray: local workers inherit the endpoint and credentials from the environment."""
    url, stop = start_moto(bucket="dtrak-e2e", prefix="runs")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield url
    ray.shutdown()
    stop()


def test_pipeline_end_to_end_on_s3(s3_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
    cfg = parse_config(tiny_config_dict("on-s3"))
    run = run_pipeline(cfg, s3_ray, console=Console(file=io.StringIO()))
    assert run.url().startswith("s3://dtrak-e2e/runs/on-s3")
    summary = run.read_json(run.SUMMARY)
    assert len(summary["lds"]) == 16
    assert run.open_array(run.features("base", "train", "l_square", 4, "gaussian", 64)).shape == (40, 64)
    objects = all_objects("dtrak-e2e")
    keys = set(objects)
    assert any(k.endswith("models/base/seed-0/diffusion_pytorch_model.safetensors") for k in keys)
    assert any("/_markers/stages/report.json" in k for k in keys)
    for key, body in objects.items():
        assert FAKE_SECRET_KEY.encode() not in body, key
        assert FAKE_ACCESS_KEY.encode() not in body, key
    assert list(tmp_path.iterdir()) == []
    # A second run finds everything in the bucket and reuses it.
    out = io.StringIO()
    run_pipeline(cfg, s3_ray, console=Console(file=out, width=200))
    assert out.getvalue().count("done earlier, reused") == len(STAGES)
