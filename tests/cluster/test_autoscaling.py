"""Work expressed as resource requests makes the autoscaler add GPU nodes, and idle nodes are removed.

Ray's fake multi-node provider (``fake_multinode``) launches each "node" as a real raylet on this
machine, with the resources its node type declares, so the real autoscaler (monitor.py) decides
when to add and remove them. The head is started by ``ray start --head --block --autoscaling-config``
in a session of its own with ``RAY_FAKE_CLUSTER=1`` (``ray.cluster_utils.AutoscalingCluster`` is not
used: its example config is missing from the wheel and it runs ``ray stop --force``, which would stop
every Ray instance on the machine). The head declares no GPU; each fake node declares one, like one
A100 node of ``cluster/aws.yaml`` scaled down.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster.head import free_port, start_head

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
IDLE_MINUTES = 0.1  # 6 s: short, so the test sees the scale-down
MIB = 1024 * 1024


def fake_cluster_config(gcs_address: str) -> dict:
    """An autoscaling config for the fake provider: a CPU-only head and up to two one-GPU nodes."""
    return {
        "cluster_name": "dtrak-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_MINUTES,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # the head's GCS port is not the default 6379
            "use_node_id_as_ip": True,
            "launch_multiple": True,  # launch as many nodes as asked for in one step, as a cloud provider does
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, "GPU": 0}, "node_config": {}, "max_workers": 0},
            # A small object store per fake node: each one is a real raylet with its own plasma store.
            "gpu_worker": {
                "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 80 * MIB},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                           "head_start_ray_commands", "worker_start_ray_commands", "cluster_synced_files",
                           "rsync_exclude", "rsync_filter")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }  # fmt: skip


@pytest.mark.timeout(900)  # about a minute alone; more on a loaded machine
def test_gpu_actors_add_nodes_and_idle_nodes_are_removed(tmp_path: Path):
    port = free_port()
    config = tmp_path / "fake_autoscaler.yaml"
    config.write_text(yaml.safe_dump(fake_cluster_config(f"127.0.0.1:{port}")))
    head = start_head(
        num_cpus=1, num_gpus=0, port=port,
        extra_args=["--autoscaling-config", str(config), "--object-store-memory", str(80 * MIB)],
        extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
    )  # fmt: skip
    try:
        driver = subprocess.run(
            [sys.executable, str(REPO / "tests" / "cluster" / "scale_driver.py"), head.gcs_address, "4", "2"],
            capture_output=True, text=True, timeout=480, env=head.env, cwd=REPO,
        )  # fmt: skip
        lines = [ln for ln in driver.stdout.splitlines() if ln.startswith("RESULT ")]
        assert driver.returncode == 0 and lines, driver.stdout[-3000:] + driver.stderr[-3000:]
        out = json.loads(lines[-1][len("RESULT ") :])
        monitor = "".join(p.read_text(errors="replace") for p in head.temp_dir.glob("session_latest/logs/monitor.*"))
    finally:
        head.stop()

    # Before: only the head, no GPU. The work needs a GPU per actor, so it ran only on added nodes.
    assert out["nodes_before"] == 1 and out["gpus_before"] == 0
    ran_on = {r["node"] for r in out["results"]}
    assert [r["item"] for r in out["results"]] == [0, 1, 2, 3]
    assert out["head"] not in ran_on and 1 <= len(ran_on) <= 2
    assert all(len(r["gpus"]) == 1 for r in out["results"])
    assert out["nodes_after_work"] >= 1 + len(ran_on)
    # After: idle for longer than idle_timeout_minutes, the GPU nodes are removed; only the head is left.
    assert out["nodes_seen_while_idle"][-1] == 1, out
    assert out["gpus_at_end"] == 0
    # The autoscaler's own log says the same: it launched gpu_worker nodes, then removed them as idle.
    added = sum(int(n) for n in re.findall(r"Adding (\d+) node\(s\) of type gpu_worker", monitor))
    removed = sum(int(n) for n in re.findall(r"Removing (\d+) nodes? of type gpu_worker \(idle\)", monitor))
    assert added >= len(ran_on) and removed == out["nodes_after_work"] - 1, monitor[-3000:]
