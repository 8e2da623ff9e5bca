"""The allocator setting keeps per-batch buffers mapped: far fewer page faults, same results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A fresh process featurizes a micro-batch of digits with the demo's UNet (per-sample gradients over
# K timesteps, then sjlt), as a featurizer actor does shard after shard, and prints its minor page
# faults over the batches after a warm-up, and a checksum of the features.
PROBE = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from dtrak_ray.allocator import keep_freed_memory
    assert keep_freed_memory()
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

def batch():
    return proj.project(gc.averaged(x, list(range(32)), "l_square", {10: grid}, 0)[10])

for _ in range(2):
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    phi = batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, float(phi.double().sum()))
"""


def _faults(mode: str) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True, cwd=ROOT)
    faults, checksum = out.stdout.split()
    return int(faults), float(checksum)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_each_batch() -> None:
    (default, phi_default), (kept, phi_kept) = _faults("default"), _faults("keep")
    # By default glibc unmaps freed gradient buffers and faults them in again next batch (thousands
    # of faults a batch); kept, the warmed-up heap serves the batches.
    assert default > 5_000, default
    assert kept < default / 4, (kept, default)
    assert phi_kept == phi_default  # the same arithmetic, bit for bit
