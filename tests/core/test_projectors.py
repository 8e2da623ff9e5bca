"""Projectors: Johnson-Lindenstrauss behaviour, prefix property, determinism."""

from __future__ import annotations

import pytest
import torch

from dtrak_ray.core.projectors import (
    COL_BLOCK,
    ROW_BLOCK,
    GaussianProjector,
    RademacherProjector,
    SJLTProjector,
    TrakCudaProjector,
    make_projector,
)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt"])
def test_johnson_lindenstrauss_inner_products(kind):
    p, k = 3000, 2048
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, p, generator=g) / p**0.5
    proj = make_projector(kind, p, k, seed=1)
    y = proj.project(x) / k**0.5  # unscaled entries: divide by sqrt(k) to compare
    true = x @ x.T
    approx = y @ y.T
    # JL: relative error of order sqrt(2/k) on norms and inner products of unit-ish vectors.
    assert torch.allclose(approx, true, atol=4 * (2 / k) ** 0.5)


def test_matches_dense_matrix_across_tiles():
    p, k = ROW_BLOCK + 37, COL_BLOCK + 5
    proj = GaussianProjector(p, k, seed=3, cache_bytes=0)
    x = torch.randn(4, p)
    torch.testing.assert_close(proj.project(x), x @ proj.matrix(), rtol=1e-4, atol=1e-3)


def test_prefix_property_and_determinism():
    p = 700
    big = GaussianProjector(p, 1200, seed=9).matrix()
    small = GaussianProjector(p, 300, seed=9).matrix()
    torch.testing.assert_close(big[:, :300], small)
    again = GaussianProjector(p, 1200, seed=9, cache_bytes=0).matrix()
    torch.testing.assert_close(big, again)
    assert not torch.allclose(GaussianProjector(p, 300, seed=10).matrix(), small)


def test_rademacher_entries_and_validation():
    m = RademacherProjector(100, 50, seed=0).matrix()
    assert set(m.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="k > 0"):
        GaussianProjector(10, 0, seed=0)
    with pytest.raises(ValueError, match="unknown projector"):
        make_projector("fourier", 10, 4, 0)
    with pytest.raises(ValueError, match="coordinates"):
        GaussianProjector(10, 4, seed=0).project(torch.zeros(2, 11))


def test_sjlt_matches_its_dense_matrix_and_is_sparse():
    proj = SJLTProjector(ROW_BLOCK + 11, 300, seed=2, s=4)
    m = proj.matrix()
    assert ((m != 0).sum(1) <= 4).all() and ((m != 0).sum(1) >= 1).all()
    x = torch.randn(3, ROW_BLOCK + 11)
    torch.testing.assert_close(proj.project(x), x @ m, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(SJLTProjector(ROW_BLOCK + 11, 300, seed=2, s=4).matrix(), m)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")
def test_trak_cuda_refused_without_gpu():
    with pytest.raises(ValueError, match="CUDA GPU"):
        TrakCudaProjector(100, 512, seed=0)


def test_same_matrix_in_another_process_and_any_tile_order():
    """Counter-based tiles: another process, or tiles drawn in reverse order, give the same matrix."""
    import hashlib
    import subprocess
    import sys

    code = (
        "import hashlib, torch; torch.set_num_threads(1);"
        "from dtrak_ray.core.projectors import GaussianProjector as G, SJLTProjector as S;"
        "print(hashlib.sha256(G(5000, 700, seed=4).matrix().numpy().tobytes()).hexdigest());"
        "print(hashlib.sha256(S(5000, 700, seed=4).matrix().numpy().tobytes()).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    proj = GaussianProjector(5000, 700, seed=4, cache_bytes=0)
    reverse = {(rb, cb): proj.tile(rb, cb) for rb in reversed(range(2)) for cb in reversed(range(2))}
    here = torch.cat([torch.cat([reverse[(rb, cb)] for cb in range(2)], 1) for rb in range(2)])[:, :700]
    assert hashlib.sha256(here.numpy().tobytes()).hexdigest() == other[0]
    assert hashlib.sha256(SJLTProjector(5000, 700, seed=4).matrix().numpy().tobytes()).hexdigest() == other[1]
