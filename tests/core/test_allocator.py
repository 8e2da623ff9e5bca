"""The allocator setting keeps per-batch buffers mapped: far fewer page faults, same results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A fresh process featurizes a micro-batch of digits with the demo's UNet (per-sample gradients over
# K timesteps, then sjlt), as a featurizer actor does shard after shard: 5 batches with glibc's
# defaults, then 5 after keep_freed_memory (each after 2 warm-up batches). It prints the minor page
# faults of each set and the features' checksums.
PROBE = """
import resource, torch
from dtrak_ray.allocator import keep_freed_memory
from dtrak_ray.config import load_config
from dtrak_ray.core.diffusion import make_scheduler, timestep_grid
from dtrak_ray.core.gradients import GradientComputer
from dtrak_ray.core.projectors import make_projector
from dtrak_ray.data import load_digits_2
from dtrak_ray.stages.common import new_model

torch.set_num_threads(1)
cfg = load_config("jobs/configs/demo.yaml")
gc = GradientComputer(new_model(cfg, 0), make_scheduler())
proj = make_projector("sjlt", gc.dim, 2048, seed=0)
x = torch.from_numpy(load_digits_2(cfg.data.classes).images[:32])
grid = timestep_grid(10)

def faults():
    for _ in range(2):
        proj.project(gc.averaged(x, list(range(32)), "l_square", {10: grid}, 0)[10])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        phi = proj.project(gc.averaged(x, list(range(32)), "l_square", {10: grid}, 0)[10])
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, float(phi.double().sum())

default = faults()
assert keep_freed_memory()
kept = faults()
print(*default, *kept)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_each_batch() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True, cwd=ROOT)
    default, phi_default, kept, phi_kept = (float(v) for v in out.stdout.split())
    # By default glibc unmaps freed gradient buffers and faults them in again next batch (thousands
    # of faults a batch); kept, the warmed-up heap serves the batches.
    assert default > 5_000, default
    assert kept < default / 4, (kept, default)
    assert phi_kept == phi_default  # the same arithmetic, bit for bit
