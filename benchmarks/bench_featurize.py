"""Featurization throughput against the physical limit: plain training throughput, same model.

    .venv/bin/python -m benchmarks.bench_featurize [--K 10] [--batch 32] [--repeats 5]

All sides run in this process, interleaved round by round, on the demo's model and digits images
with one torch thread: (a) plain training forward + backward, at the featurizer's batch size B
(B images, one random timestep each, as a training step runs) and over the featurizer's very
B*K (sample, timestep) pairs in one batch; (b) dtrak-ray's featurizer: per-sample gradients
averaged over K timesteps, projected to k, and written to a Zarr array in a local store, for every
projector. Throughput is sample-timesteps per second. The last lines print featurize / train
ratios at the same batch size B (the issue's goal: >= 0.7 with sjlt); the line before them, the
stricter ratio against training on the same B*K pairs at once.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable

import numpy as np
import torch

from benchmarks._machine import interleaved, load_note
from dtrak_ray.allocator import keep_freed_memory
from dtrak_ray.config import load_config
from dtrak_ray.core.diffusion import add_noise, make_scheduler, timestep_grid
from dtrak_ray.core.gradients import GradientComputer
from dtrak_ray.core.projectors import make_projector
from dtrak_ray.data import load_digits_2
from dtrak_ray.stages.common import new_model
from dtrak_ray.storage import Store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="jobs/configs/demo.yaml")
    ap.add_argument("--K", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the best of each side counts")
    args = ap.parse_args()
    keep_freed_memory()  # as in every pipeline worker (dtrak_ray.allocator); both sides run with it
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    model = new_model(cfg, 0)
    sched = make_scheduler()
    x = torch.from_numpy(load_digits_2(cfg.data.classes).images[: args.batch])
    grid = timestep_grid(args.K)
    pairs = args.batch * len(grid)

    # (a) the limit, plain training: forward + backward of the loss, gradients of the batch (not per
    # sample). "batch B": B images at one random timestep each, as a training step at the
    # featurizer's batch size runs (the reference); "B*K pairs": one step over the very same
    # B*K (sample, timestep) pairs the featurizer differentiates, a 10x larger and more efficient batch.
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)

    def train_step_of(xs: torch.Tensor, ts: torch.Tensor) -> Callable[[], None]:
        eps = torch.randn(xs.shape, generator=g)

        def step() -> None:
            loss = (model(add_noise(sched, xs, eps, ts), ts).sample - eps).pow(2).mean()
            torch.autograd.grad(loss, params)

        return step

    train = {
        "batch B": train_step_of(x, torch.randint(0, 1000, (args.batch,), generator=g)),
        "B*K pairs": train_step_of(x.repeat_interleave(len(grid), 0), torch.tensor(grid).repeat(args.batch)),
    }
    per_step = {"batch B": args.batch, "B*K pairs": pairs}

    gc = GradientComputer(model, sched)
    contenders: dict[str, Callable[[], None]] = {f"train ({name})": fn for name, fn in train.items()}
    kinds = ("sjlt", "gaussian", "rademacher")
    with tempfile.TemporaryDirectory() as tmp:
        run = Store(tmp).run("bench")
        for kind in kinds:
            proj = make_projector(kind, gc.dim, args.k, seed=0)
            arr = run.create_array(f"features/{kind}.zarr", (args.batch, args.k), (args.batch, args.k), "float32", {"projector": kind})

            def featurize(arr=arr, proj=proj) -> None:  # bind this projector's objects
                g = gc.averaged(x, list(range(args.batch)), "l_square", {args.K: grid}, noise_seed=0)[args.K]
                arr[...] = proj.project(g).numpy().astype(np.float32)

            contenders[kind] = featurize
        best = interleaved(contenders, args.repeats)
    rate = {kind: pairs / best[kind] for kind in kinds} | {name: per_step[name] / best[f"train ({name})"] for name in train}
    print(load_note())
    print(f"model: {sum(p.numel() for p in params):,} parameters; featurizer: B={args.batch} samples x K={args.K} timesteps "
          f"= {pairs} sample-timesteps per call, k={args.k}, one torch thread")
    print(f"sample-timesteps/s, best of {args.repeats} interleaved rounds (one call of each side per round):")
    for name in train:
        print(f"  train, {name:9s} ({per_step[name]:4d} sample-timesteps a step): {rate[name]:9.1f}")
    for kind in kinds:
        print(f"  featurize, {kind:10s}:                          {rate[kind]:9.1f}")
    print("featurize / train throughput against train at B*K pairs (the same pairs in one batch): "
          + ", ".join(f"{kind} {rate[kind] / rate['B*K pairs']:.2f}" for kind in kinds))
    print("ratios (featurize / train throughput at the same batch size B, higher is better; goal >= 0.7 with sjlt):")
    for kind in kinds:
        print(f"  {kind}: {rate[kind] / rate['batch B']:.2f}")


if __name__ == "__main__":
    main()
