"""Featurization throughput against the physical limit: plain training throughput, same model.

    .venv/bin/python -m benchmarks.bench_featurize [--K 10] [--batch 32] [--repeats 3]

Both sides run in this process, one after the other, on the demo's model and digits images with
one torch thread: (a) plain forward + backward of a batch of (sample, timestep) pairs, as in
training; (b) dtrak-ray's featurizer: per-sample gradients averaged over K timesteps, projected
to k, and written to a Zarr array in a local store, for every projector. Throughput is
sample-timesteps per second; the last lines print featurize / train ratios (goal: >= 0.7 with sjlt).
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

from benchmarks._machine import best_of
from dtrak_ray.config import load_config
from dtrak_ray.core.diffusion import add_noise, make_scheduler, timestep_grid
from dtrak_ray.core.gradients import GradientComputer
from dtrak_ray.core.projectors import make_projector
from dtrak_ray.data import load_digits_2
from dtrak_ray.stages.common import new_model
from dtrak_ray.storage import Store


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    return best_of(fn, repeats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="jobs/configs/demo.yaml")
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    model = new_model(cfg, 0)
    sched = make_scheduler()
    x = torch.from_numpy(load_digits_2(cfg.data.classes).images[: args.batch])
    grid = timestep_grid(args.K)
    pairs = args.batch * len(grid)

    # (a) the limit: one training-style forward + backward over the same (sample, timestep) pairs.
    model.eval()
    xs = x.repeat_interleave(len(grid), 0)
    ts = torch.tensor(grid).repeat(args.batch)
    eps = torch.randn_like(xs)
    params = [p for p in model.parameters() if p.requires_grad]

    def train_step() -> None:
        loss = (model(add_noise(sched, xs, eps, ts), ts).sample ** 2).mean()
        torch.autograd.grad(loss, params)

    t_train = _best(train_step, args.repeats)
    print(f"model: {sum(p.numel() for p in params):,} parameters; {pairs} sample-timesteps per step (B={args.batch}, K={args.K})")
    print(f"train (forward+backward): {pairs / t_train:9.1f} sample-timesteps/s")

    gc = GradientComputer(model, sched)
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Store(tmp).run("bench")
        for kind in ("sjlt", "gaussian", "rademacher"):
            proj = make_projector(kind, gc.dim, args.k, seed=0)
            arr = run.create_array(f"features/{kind}.zarr", (args.batch, args.k), (args.batch, args.k), "float32", {"projector": kind})

            def featurize(arr=arr, proj=proj) -> None:  # bind this projector's objects
                g = gc.averaged(x, list(range(args.batch)), "l_square", {args.K: grid}, noise_seed=0)[args.K]
                arr[...] = proj.project(g).numpy().astype(np.float32)

            t_feat = _best(featurize, args.repeats)
            ratios[kind] = (pairs / t_feat) / (pairs / t_train)
            print(f"featurize ({kind:10s} k={args.k}): {pairs / t_feat:9.1f} sample-timesteps/s")
    print("ratios (featurize / train throughput, higher is better; goal >= 0.7 with sjlt):")
    for kind, r in ratios.items():
        print(f"  {kind}: {r:.2f}")


if __name__ == "__main__":
    main()
