"""Random projections of gradients, phi = P^T g (SPEC.md section 2).

Interface: a projector has ``k`` and ``project(G: (B, p)) -> (B, k)``; ``matrix()`` builds the
dense p x k matrix (for tests and tiny p only).

Implementations:
- ``IdentityProjector`` ("none"): no projection, k = p. The reference.
- ``GaussianProjector``: the paper's unscaled i.i.d. N(0, 1) matrix.
- ``RademacherProjector``: the same with +-1 entries.
- ``SJLTProjector``: a sparse Johnson-Lindenstrauss transform: each gradient coordinate goes to
  ``s`` output coordinates with random signs, O(p s) per sample instead of O(p k). Entries are
  +-sqrt(k / s), so E[P P^T] = k I as for the dense kinds and one lambda grid serves them all.
  It has no prefix property (a coordinate's targets depend on k).
- ``TrakCudaProjector``: the TRAK library's CudaProjector (fast_jl), the authors' choice; needs a
  CUDA device and fast_jl, and is refused with a clear message elsewhere.

P is never stored: it is generated in (row block, column block) tiles, each from its own
counter-based seed ``mix_seed(seed, row_block, col_block)`` on the CPU generator. So the matrix is the
same on any worker, device and shard order, and the first k' columns of a k-projection equal the
k'-projection (column tiles have a fixed width), letting one run at the largest k serve a sweep.
Tiles may be cached in memory up to ``cache_bytes``: a worker that projects many shards then
generates P once.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dtrak_ray.core.diffusion import mix_seed

ROW_BLOCK = 4096
COL_BLOCK = 512


class Projector(Protocol):
    k: int

    def project(self, grads: torch.Tensor) -> torch.Tensor: ...


class IdentityProjector:
    """No projection: features are the full gradients."""

    def __init__(self, p: int):
        self.p = self.k = p

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return grads

    def matrix(self) -> torch.Tensor:
        return torch.eye(self.p)


class _TiledProjector:
    def __init__(self, p: int, k: int, seed: int, cache_bytes: int = 2 << 30):
        if p <= 0 or k <= 0:
            raise ValueError(f"projector needs p > 0 and k > 0, got p={p}, k={k}")
        self.p, self.k, self.seed = p, k, seed
        self._cache: dict[tuple[int, int], torch.Tensor] | None = {} if p * k * 4 <= cache_bytes else None

    def _draw(self, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def tile(self, rb: int, cb: int) -> torch.Tensor:
        """Tile (rb, cb): rows [rb*ROW_BLOCK, ...) x columns [cb*COL_BLOCK, ...) of P, full width."""
        if self._cache is not None and (rb, cb) in self._cache:
            return self._cache[(rb, cb)]
        rows = min(ROW_BLOCK, self.p - rb * ROW_BLOCK)
        g = torch.Generator().manual_seed(mix_seed(self.seed, rb, cb))
        tile = self._draw(rows, COL_BLOCK, g)
        if self._cache is not None:
            self._cache[(rb, cb)] = tile
        return tile

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, p) -> (B, k), accumulated in float32 on the gradients' device."""
        if grads.shape[-1] != self.p:
            raise ValueError(f"gradients have {grads.shape[-1]} coordinates, projector expects p={self.p}")
        n_cb = -(-self.k // COL_BLOCK)
        out = torch.zeros(grads.shape[0], n_cb * COL_BLOCK, dtype=torch.float32, device=grads.device)
        g32 = grads.to(torch.float32)
        for rb in range(-(-self.p // ROW_BLOCK)):
            rows = g32[:, rb * ROW_BLOCK : (rb + 1) * ROW_BLOCK]
            for cb in range(n_cb):
                out[:, cb * COL_BLOCK : (cb + 1) * COL_BLOCK] += rows @ self.tile(rb, cb).to(grads.device)
        return out[:, : self.k]

    def matrix(self) -> torch.Tensor:
        """The dense p x k matrix (tests and tiny p only)."""
        n_cb = -(-self.k // COL_BLOCK)
        rows = [torch.cat([self.tile(rb, cb) for cb in range(n_cb)], dim=1) for rb in range(-(-self.p // ROW_BLOCK))]
        return torch.cat(rows, dim=0)[:, : self.k]


class GaussianProjector(_TiledProjector):
    """Unscaled N(0, 1) entries, as the authors use."""

    def _draw(self, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g)


class RademacherProjector(_TiledProjector):
    """Entries +-1 with equal probability."""

    def _draw(self, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 2, (rows, cols), generator=g).mul_(2).sub_(1).to(torch.float32)


class SJLTProjector:
    """Sparse JL: coordinate i adds sign * sqrt(k/s) * g_i to ``s`` output coordinates."""

    def __init__(self, p: int, k: int, seed: int, s: int = 4):
        if p <= 0 or k <= 0 or s <= 0:
            raise ValueError(f"sjlt projector needs p, k, s > 0, got p={p}, k={k}, s={s}")
        self.p, self.k, self.s, self.seed = p, k, min(s, k), seed
        idx, sign = [], []
        for rb in range(-(-p // ROW_BLOCK)):
            rows = min(ROW_BLOCK, p - rb * ROW_BLOCK)
            g = torch.Generator().manual_seed(mix_seed(seed, rb, -7))
            idx.append(torch.randint(0, k, (rows, self.s), generator=g))
            sign.append(torch.randint(0, 2, (rows, self.s), generator=g).mul_(2).sub_(1).to(torch.float32))
        self.idx = torch.cat(idx)  # (p, s)
        self.scale = (k / self.s) ** 0.5
        self.sign = torch.cat(sign) * self.scale
        # Coordinates with a negative sign go to a second bank of k columns, subtracted at the end:
        # the scatter then adds the gradient as it is, with no signed (B, p) copy per j.
        self._banked = [(self.idx[:, j] + k * (self.sign[:, j] < 0)).contiguous() for j in range(self.s)]

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.p:
            raise ValueError(f"gradients have {grads.shape[-1]} coordinates, projector expects p={self.p}")
        g32 = grads.to(torch.float32)
        if self._banked[0].device != grads.device:
            self._banked = [b.to(grads.device) for b in self._banked]
        banks = torch.zeros(grads.shape[0], 2 * self.k, dtype=torch.float32, device=grads.device)
        for b in self._banked:
            banks.index_add_(1, b, g32)
        return (banks[:, : self.k] - banks[:, self.k :]).mul_(self.scale)

    def matrix(self) -> torch.Tensor:
        m = torch.zeros(self.p, self.k)
        for j in range(self.s):
            m.index_put_((torch.arange(self.p), self.idx[:, j]), self.sign[:, j], accumulate=True)
        return m


class TrakCudaProjector:
    """The TRAK library's CUDA projector (Rademacher, fast_jl kernels)."""

    def __init__(self, p: int, k: int, seed: int, device: str = "cuda"):
        if not torch.cuda.is_available():
            raise ValueError("projector 'trak-cuda' needs a CUDA GPU; on this machine use gaussian, rademacher or sjlt")
        try:
            import fast_jl  # noqa: F401
            from trak.projectors import CudaProjector, ProjectionType
        except ImportError:
            raise ValueError(
                "projector 'trak-cuda' needs TRAK's fast_jl kernels: pip install traker[fast] (nvcc required), "
                "or use gaussian, rademacher or sjlt"
            ) from None
        self.p, self.k = p, k
        # fast_jl works in multiples of 512 output dimensions.
        self._proj = CudaProjector(p, k, seed, ProjectionType.rademacher, device, max_batch_size=32)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        return self._proj.project(grads.to("cuda"), model_id=0).float().cpu()


def make_projector(kind: str, p: int, k: int, seed: int, cache_bytes: int = 2 << 30) -> Projector:
    """Build a projector from its config name."""
    if kind == "sjlt":
        return SJLTProjector(p, k, seed)
    if kind == "trak-cuda":
        return TrakCudaProjector(p, k, seed)
    if kind == "gaussian":
        return GaussianProjector(p, k, seed, cache_bytes)
    if kind == "rademacher":
        return RademacherProjector(p, k, seed, cache_bytes)
    if kind == "none":
        return IdentityProjector(p)
    raise ValueError(f"unknown projector {kind!r}: choose gaussian, rademacher, sjlt, trak-cuda or none")
