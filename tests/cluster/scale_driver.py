"""Driver for test_autoscaling.py: GPU work through dtrak-ray's own actor pool, on an autoscaling cluster.

Run as a script (so the worker function travels by value, not by import) with the head's environment:
``python tests/cluster/scale_driver.py GCS_ADDRESS ITEMS SECONDS``. It asks for ``map_actors`` with one GPU
per actor, exactly as the featurize stage does on a GPU cluster, on a cluster whose head has no GPU, so
the work can only run once the autoscaler has added GPU nodes. Then it watches the cluster until the
idle GPU nodes are removed. It prints one JSON object: where each item ran and the node counts seen.
"""

from __future__ import annotations

import json
import sys
import time

import ray

from dtrak_ray.distributed.cluster import Resources
from dtrak_ray.distributed.pool import map_actors


class Sleeper:
    """Stands in for a featurizer: holds 'a model' and works on one item at a time."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, item: int) -> dict:
        time.sleep(self.seconds)
        ctx = ray.get_runtime_context()
        return {"item": item, "node": ctx.get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}


def alive() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def main(address: str, items: int, seconds: float, settle_s: float = 120) -> dict:
    ray.init(address=address, log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()
    out: dict = {"head": head, "nodes_before": len(alive()), "gpus_before": ray.cluster_resources().get("GPU", 0)}
    t0 = time.time()
    res = Resources(workers=2, cpus=1, gpus=1, torch_threads=1)
    out["results"] = map_actors(lambda: Sleeper(seconds), list(range(items)), res, desc="fake GPU work")
    out["work_s"] = time.time() - t0
    out["nodes_after_work"] = len(alive())
    # map_actors kills its actors when done: the GPU nodes are now idle and should be removed.
    t1, seen = time.time(), []
    while time.time() - t1 < settle_s:
        n = len(alive())
        seen.append(n)
        if n == 1:
            break
        time.sleep(1)
    out["nodes_seen_while_idle"] = seen
    out["removed_after_s"] = time.time() - t1
    out["gpus_at_end"] = ray.cluster_resources().get("GPU", 0)
    ray.shutdown()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))), flush=True)
