"""Random projections of gradients, phi = P^T g (SPEC.md section 2).

Interface: a projector has ``k`` and ``project(G: (B, p)) -> (B, k)``; ``matrix()`` builds the
dense p x k matrix (for tests and tiny p only).

Implementations:
- ``IdentityProjector`` ("none"): no projection, k = p. The reference.
- ``GaussianProjector``: the paper's unscaled i.i.d. N(0, 1) matrix.
- ``RademacherProjector``: the same with +-1 entries.

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


def make_projector(kind: str, p: int, k: int, seed: int, cache_bytes: int = 2 << 30) -> Projector:
    """Build a projector from its config name."""
    if kind == "gaussian":
        return GaussianProjector(p, k, seed, cache_bytes)
    if kind == "rademacher":
        return RademacherProjector(p, k, seed, cache_bytes)
    if kind == "none":
        return IdentityProjector(p)
    raise ValueError(f"unknown projector {kind!r}: choose gaussian, rademacher or none")
