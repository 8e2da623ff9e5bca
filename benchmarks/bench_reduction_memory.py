"""Peak memory of reduce + score at N and at 4N training samples, same k: the ratio stays near 1.

    .venv/bin/python -m benchmarks.bench_reduction_memory [--n 1024] [--k 512] [--m 128]

Each size runs in its own subprocess, on features written to a local store, through the score
stage's own code: the per-shard partial Gram products (``_gram_leaf``, what each Ray task of the
tree reduction runs) summed as a tree, one eigendecomposition, then every block of test rows
scored against every train shard for the paper's 27 lambdas (``_score_item``, what each scoring
task runs), written to a Zarr array (27, m, N) with the top-k indices beside it. Here the tasks run
one after the other in one process, so the process's peak is what one worker needs. Peak memory is
measured with tracemalloc (every numpy allocation) and, for the whole process, ru_maxrss. The
features (N x k) and the scores (27 x m x N) grow 4x; the peak must not. Ratios on the last lines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import io, json, resource, sys, time, tracemalloc
import numpy as np
from rich.console import Console
from dtrak_ray.config import parse_config
from dtrak_ray.core.kernel import factorize, lambda_grid
from dtrak_ray.distributed.cluster import Resources
from dtrak_ray.stages.common import Context
from dtrak_ray.stages.featurize import features_key
from dtrak_ray.stages.score import _gram_leaf, _score_item, kernel_spec, write_index
from dtrak_ray.storage import Store

n, k, m, shard, block, store = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
cfg = parse_config({"name": "mem", "features": {"k": k, "K": [10]}, "scoring": {"test_block": block, "top_k": 10}})
run = Store(store).run("mem")
ctx = Context(cfg=cfg, run=run, resources=Resources(workers=1, cpus=1, gpus=0, torch_threads=1), console=Console(file=io.StringIO()))
rng = np.random.default_rng(0)
for split, rows in (("train", n), ("val", m)):
    arr = run.create_array(features_key(run, cfg, split, "l_square", 10, k), (rows, k), (shard, k), "float32", {"digest": "x", "model_digest": "y"})
    for s in range(0, rows, shard):  # written shard by shard, as the featurizer actors do
        arr[s : s + shard] = rng.standard_normal((min(shard, rows - s), k)).astype(np.float32)
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
t0 = time.perf_counter()
train_key = features_key(run, cfg, "train", "l_square", 10, k)
ready = []  # the tree of sums as tree_sum runs it with one worker: fan-in 4, partials summed as they finish
for s in range(0, n, shard):
    ready.append(_gram_leaf((s, min(s + shard, n)), run, train_key, "kxk"))
    if len(ready) >= 4:
        ready = ready[4:] + [sum(ready[:4])]
while len(ready) > 1:
    ready = ready[4:] + [sum(ready[:4])]
kernel = factorize(ready[0], "kxk")
del ready
spec = kernel_spec(ctx, "base", "base", "val", "l_square", 10, run.method_scores("base", "val", "mem"), "kern", kernel)
L = len(lambda_grid())
run.create_array(spec.out_key, (L, m, n), (1, block, shard), "float32", {})
run.create_array(f"{run.top_of(spec.out_key)}/indices", (L, m, 10), (L, block, 10), "int64", {})
run.create_array(f"{run.top_of(spec.out_key)}/values", (L, m, 10), (L, block, 10), "float32", {})
for a in range(0, m, block):
    _score_item((0, a, min(a + block, m)), [spec], {"kern": kernel}, run, 10)
seconds = time.perf_counter() - t0
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
check = run.open_array(spec.out_key)[3, :2, :5]
print(json.dumps({"n": n, "peak_mib": peak / 2**20, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mib": rss_before / 1024, "seconds": seconds, "finite": bool(np.isfinite(check).all())}))
"""


def measure(n: int, k: int, m: int, shard: int, block: int) -> dict:
    with tempfile.TemporaryDirectory() as store:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(k), str(m), str(shard), str(block), store],
                             check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="N of the small size (the large one is 4N); N >= k, the k x k form")
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--m", type=int, default=128, help="test samples")
    ap.add_argument("--shard", type=int, default=256, help="train rows per shard (Zarr chunk)")
    ap.add_argument("--block", type=int, default=64, help="test rows per scoring block")
    args = ap.parse_args()
    small = measure(args.n, args.k, args.m, args.shard, args.block)
    large = measure(4 * args.n, args.k, args.m, args.shard, args.block)
    for r in (small, large):
        feats = r["n"] * args.k * 4 / 2**20
        scores = 27 * args.m * r["n"] * 4 / 2**20
        print(f"N = {r['n']:6d}, k = {args.k}: features {feats:7.1f} MiB, scores {scores:7.1f} MiB on disk; "
              f"peak traced {r['peak_mib']:7.1f} MiB, process max RSS {r['maxrss_mib']:7.1f} MiB, {r['seconds']:.1f} s")
    print(f"peak traced memory ratio 4N / N = {large['peak_mib'] / small['peak_mib']:.2f}")
    print(f"process max RSS ratio 4N / N = {large['maxrss_mib'] / small['maxrss_mib']:.2f}")


if __name__ == "__main__":
    main()
