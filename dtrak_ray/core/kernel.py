"""D-TRAK scores for every ridge lambda from one eigendecomposition (SPEC.md section 2).

Interface:
- ``choose_form(n_train, k) -> "kxk" | "NxN"``: the smaller Gram matrix.
- ``gram(phi, form) -> (r, r)``: Phi^T Phi (kxk) or Phi Phi^T (NxN), float64.
- ``factorize(gram_matrix, form) -> KernelEig``: symmetric eigendecomposition, eigenvalues clipped at 0.
- ``fit_kernel(phi_train, form=None) -> KernelEig``: ``gram`` then ``factorize``.
- ``scores_for_lambdas(kernel, phi_train, phi_test, lambdas) -> (L, m, N)``: scores for a lambda sweep.
- ``scores_direct(phi_train, phi_test, lam) -> (m, N)``: the plain linear solve, a reference for tests.
- ``lambda_grid() -> list[float]``: the paper's 27 lambdas.

Blocked interface (for features that do not fit in memory; the stages stream shards from the store):
- ``gram_partial(block, form) -> (r, r)``: one shard's share of the Gram matrix: Phi_b^T Phi_b for a
  block of rows (kxk), Phi_c Phi_c^T for a block of columns (NxN); the Gram matrix is their sum.
- ``left_factor(kernel, phi_test_block, cross=None)``: A = Phi_test V (kxk) or C = Phi_test Phi^T U (NxN,
  ``cross`` = Phi_test Phi^T assembled from train shards).
- ``right_factor(kernel, phi_train_shard=None, rows=None)``: B = Phi_shard V (kxk) or U[rows] (NxN).
- ``scores_block(kernel, left, right, lambdas) -> (L, b, n)``: the scores of a test block against a
  train shard for every lambda; the full (L, m, N) array is the grid of such blocks.
- ``self_influence(kernel, right, lambdas) -> (L, n)``: phi_n^T (Phi^T Phi + lam I)^-1 phi_n of train
  samples (relative influence functions).
- ``merge_topk(values, indices, new_values, new_indices, top)``: a running top-k over train shards.
Memory: k x k (or N x N) for the factorization, plus one test block and one train shard, whatever N.

Maths. With train features Phi (N x k) and test features Phi_test (m x k), the scores are

    tau(lam) = Phi_test (Phi^T Phi + lam I_k)^-1 Phi^T                         (m x N)
             = Phi_test Phi^T (Phi Phi^T + lam I_N)^-1                         (push-through identity)

If Phi^T Phi = V diag(s) V^T then (Phi^T Phi + lam I)^-1 = V diag(1 / (s + lam)) V^T: the eigenvectors
do not depend on lambda, so one O(r^3) factorization serves the whole sweep and each further lambda
costs only a rescale and one matrix product. The same holds for Phi Phi^T = U diag(s) U^T.

Pure numpy/scipy: no torch, no Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import scipy.linalg

KernelForm = Literal["kxk", "NxN"]

_FORMS: tuple[str, ...] = get_args(KernelForm)

# Rows (kxk) or columns (NxN) of Phi cast to float64 at a time in ``gram``: the accumulation is float64
# without ever holding a float64 copy of a large float32 feature matrix.
_GRAM_BLOCK = 2048


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on ndarrays is ambiguous
class KernelEig:
    """Eigendecomposition of the Gram matrix in the chosen form, float64.

    ``G = eigvecs @ diag(eigvals) @ eigvecs.T`` with G = Phi^T Phi (form "kxk", r = k) or
    G = Phi Phi^T (form "NxN", r = N).

    Attributes:
        form: which Gram matrix was factorized.
        eigvals: (r,) eigenvalues, ascending, clipped at >= 0.
        eigvecs: (r, r) orthonormal eigenvectors, one per column.
    """

    form: KernelForm
    eigvals: np.ndarray
    eigvecs: np.ndarray

    def __post_init__(self) -> None:
        _check_form(self.form)
        if self.eigvals.ndim != 1:
            raise ValueError(f"eigvals: expected shape (r,), got {self.eigvals.shape}")
        r = self.eigvals.shape[0]
        if self.eigvecs.shape != (r, r):
            raise ValueError(f"eigvecs: expected shape ({r}, {r}), got {self.eigvecs.shape}")

    @property
    def size(self) -> int:
        """r: k for the "kxk" form, N for the "NxN" form."""
        return int(self.eigvals.shape[0])


def choose_form(n_train: int, k: int) -> KernelForm:
    """Pick the smaller Gram matrix: "NxN" (N x N) when ``n_train < k``, else "kxk" (k x k)."""
    if n_train < 1:
        raise ValueError(f"n_train: expected >= 1, got {n_train}")
    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    return "NxN" if n_train < k else "kxk"


def gram(phi: np.ndarray, form: KernelForm) -> np.ndarray:
    """Gram matrix of the train features, accumulated in float64 whatever ``phi``'s dtype.

    Args:
        phi: (N, k) train features Phi.
        form: "kxk" gives Phi^T Phi (k, k); "NxN" gives Phi Phi^T (N, N).

    Returns:
        (r, r) float64, symmetric up to rounding.
    """
    _check_form(form)
    phi = _check_2d(phi, "phi")
    n, k = phi.shape
    if form == "kxk":
        g = np.zeros((k, k), dtype=np.float64)
        for start in range(0, n, _GRAM_BLOCK):
            block = phi[start : start + _GRAM_BLOCK].astype(np.float64, copy=False)
            g += block.T @ block
    else:
        g = np.zeros((n, n), dtype=np.float64)
        for start in range(0, k, _GRAM_BLOCK):
            block = phi[:, start : start + _GRAM_BLOCK].astype(np.float64, copy=False)
            g += block @ block.T
    return g


def factorize(gram_matrix: np.ndarray, form: KernelForm) -> KernelEig:
    """Symmetric eigendecomposition G = V diag(s) V^T of a Gram matrix.

    Args:
        gram_matrix: (r, r) Gram matrix from :func:`gram`.
        form: the form it was built in (recorded, not inferable from the shape).

    Returns:
        :class:`KernelEig` with s clipped at 0: G is positive semi-definite, so negative eigenvalues
        are rounding noise, and clipping keeps s + lam >= lam > 0 for every lambda.
    """
    _check_form(form)
    g = np.asarray(gram_matrix, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram_matrix: expected a square (r, r) matrix, got shape {g.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError("gram_matrix: contains non-finite values")
    # eigh reads one triangle only; symmetrizing first makes the result independent of which one
    # and of the asymmetric rounding of a blocked accumulation.
    sym = 0.5 * (g + g.T)
    eigvals, eigvecs = scipy.linalg.eigh(sym)
    return KernelEig(form=form, eigvals=np.clip(eigvals, 0.0, None), eigvecs=eigvecs)


def fit_kernel(phi_train: np.ndarray, form: KernelForm | None = None) -> KernelEig:
    """Gram matrix of ``phi_train`` (N, k) in ``form`` (None: :func:`choose_form`), factorized."""
    phi_train = _check_2d(phi_train, "phi_train")
    if form is None:
        form = choose_form(*phi_train.shape)
    return factorize(gram(phi_train, form), form)


def scores_for_lambdas(
    kernel: KernelEig,
    phi_train: np.ndarray,
    phi_test: np.ndarray,
    lambdas: Sequence[float],
) -> np.ndarray:
    """D-TRAK scores tau(lam) = Phi_test (Phi^T Phi + lam I)^-1 Phi^T for every lam, one factorization.

    Form "kxk" (Phi^T Phi = V diag(s) V^T):
        A = Phi_test V (m, k), B = Phi V (N, k), tau(lam) = A diag(1 / (s + lam)) B^T.
    Form "NxN" (Phi Phi^T = U diag(s) U^T):
        C = Phi_test Phi^T U (m, N), tau(lam) = C diag(1 / (s + lam)) U^T.

    Args:
        kernel: :func:`fit_kernel` of ``phi_train``.
        phi_train: (N, k) train features Phi, the ones ``kernel`` was fitted on.
        phi_test: (m, k) test features Phi_test.
        lambdas: L ridge values, each finite and > 0.

    Returns:
        (L, m, N) float64; ``[l, i, n]`` is the score of train sample n for test sample i at lambdas[l].
    """
    phi_train = _check_2d(phi_train, "phi_train")
    phi_test = _check_2d(phi_test, "phi_test")
    n, k = phi_train.shape
    if phi_test.shape[1] != k:
        raise ValueError(f"phi_test: expected shape (m, {k}) to match phi_train's k, got {phi_test.shape}")
    lams = _check_lambdas(lambdas)
    expected_r = k if kernel.form == "kxk" else n
    if kernel.size != expected_r:
        dim = "k" if kernel.form == "kxk" else "N (phi_train rows)"
        raise ValueError(f"kernel: {kernel.form} form has size {kernel.size}, expected {dim} = {expected_r}")

    train = phi_train.astype(np.float64, copy=False)
    test = phi_test.astype(np.float64, copy=False)
    if kernel.form == "kxk":
        left = test @ kernel.eigvecs  # A (m, k)
        right = train @ kernel.eigvecs  # B (N, k)
    else:
        left = (test @ train.T) @ kernel.eigvecs  # C (m, N)
        right = kernel.eigvecs  # U (N, N)

    out = np.empty((lams.shape[0], test.shape[0], n), dtype=np.float64)
    for idx, lam in enumerate(lams):
        # Scaling the columns of the left factor is the diag(1 / (s + lam)) product without forming it.
        out[idx] = (left / (kernel.eigvals + lam)) @ right.T
    return out


def scores_direct(phi_train: np.ndarray, phi_test: np.ndarray, lam: float) -> np.ndarray:
    """Reference scores by a plain k x k solve: Phi_test (Phi^T Phi + lam I_k)^-1 Phi^T, (m, N) float64.

    O(k^3) per lambda; for tests and checks, not for sweeps.
    """
    phi_train = _check_2d(phi_train, "phi_train")
    phi_test = _check_2d(phi_test, "phi_test")
    k = phi_train.shape[1]
    if phi_test.shape[1] != k:
        raise ValueError(f"phi_test: expected shape (m, {k}) to match phi_train's k, got {phi_test.shape}")
    lam_f = float(lam)
    if not (np.isfinite(lam_f) and lam_f > 0):
        raise ValueError(f"lam: must be finite and > 0, got {lam!r}")
    train = phi_train.astype(np.float64, copy=False)
    test = phi_test.astype(np.float64, copy=False)
    system = train.T @ train + lam_f * np.eye(k)
    return test @ np.linalg.solve(system, train.T)


def gram_partial(block: np.ndarray, form: KernelForm) -> np.ndarray:
    """One block's share of the Gram matrix, float64.

    Form "kxk": ``block`` is a block of rows Phi_b (n_b, k) and the share is Phi_b^T Phi_b (k, k);
    summed over row blocks it gives Phi^T Phi. Form "NxN": ``block`` is a block of columns Phi_c
    (N, k_c) and the share is Phi_c Phi_c^T (N, N); summed over column blocks it gives Phi Phi^T.
    Addition is associative, so any tree of sums of the shares equals :func:`gram` up to rounding.
    """
    _check_form(form)
    return gram(block, "kxk" if form == "kxk" else "NxN")


def left_factor(kernel: KernelEig, phi_test: np.ndarray, cross: np.ndarray | None = None) -> np.ndarray:
    """Test side of the scores, float64: A = Phi_test V (b, k) for "kxk"; C = (Phi_test Phi^T) U (b, N) for "NxN".

    Args:
        kernel: the factorized Gram matrix.
        phi_test: (b, k) a block of test features.
        cross: "NxN" only: (b, N) Phi_test Phi^T, assembled from the train shards by the caller.
    """
    phi_test = _check_2d(phi_test, "phi_test").astype(np.float64, copy=False)
    if kernel.form == "kxk":
        if phi_test.shape[1] != kernel.size:
            raise ValueError(f"phi_test: expected shape (b, {kernel.size}), got {phi_test.shape}")
        return phi_test @ kernel.eigvecs
    if cross is None:
        raise ValueError("cross: the NxN form needs Phi_test Phi^T (b, N)")
    cross = _check_2d(cross, "cross").astype(np.float64, copy=False)
    if cross.shape != (phi_test.shape[0], kernel.size):
        raise ValueError(f"cross: expected shape ({phi_test.shape[0]}, {kernel.size}), got {cross.shape}")
    return cross @ kernel.eigvecs


def right_factor(kernel: KernelEig, phi_train: np.ndarray | None = None, rows: slice | None = None) -> np.ndarray:
    """Train side of the scores for one shard, float64: B = Phi_shard V (n, k) ("kxk") or U[rows] (n, N) ("NxN")."""
    if kernel.form == "kxk":
        if phi_train is None:
            raise ValueError("phi_train: the kxk form needs the shard's train features")
        phi_train = _check_2d(phi_train, "phi_train").astype(np.float64, copy=False)
        if phi_train.shape[1] != kernel.size:
            raise ValueError(f"phi_train: expected shape (n, {kernel.size}), got {phi_train.shape}")
        return phi_train @ kernel.eigvecs
    if rows is None:
        raise ValueError("rows: the NxN form needs the shard's row range")
    return kernel.eigvecs[rows]


def scores_block(kernel: KernelEig, left: np.ndarray, right: np.ndarray, lambdas: Sequence[float]) -> np.ndarray:
    """(L, b, n) scores of a test block (``left``) against a train shard (``right``) for every lambda.

    tau(lam) = left diag(1 / (s + lam)) right^T, the block of :func:`scores_for_lambdas`.
    """
    lams = _check_lambdas(lambdas)
    if left.shape[1] != kernel.size or right.shape[1] != kernel.size:
        raise ValueError(f"left {left.shape} and right {right.shape}: expected {kernel.size} columns each")
    out = np.empty((lams.shape[0], left.shape[0], right.shape[0]), dtype=np.float64)
    for idx, lam in enumerate(lams):
        out[idx] = (left / (kernel.eigvals + lam)) @ right.T
    return out


def self_influence(kernel: KernelEig, right: np.ndarray, lambdas: Sequence[float]) -> np.ndarray:
    """(L, n) phi_n^T (Phi^T Phi + lam I_k)^-1 phi_n for the train rows of ``right`` (:func:`right_factor`).

    "kxk": with B = Phi V, the value is sum_j B[n, j]^2 / (s_j + lam).
    "NxN": Phi (Phi^T Phi + lam I)^-1 Phi^T = K (K + lam I)^-1 with K = Phi Phi^T = U diag(s) U^T, whose
    diagonal is sum_j U[n, j]^2 s_j / (s_j + lam).
    """
    lams = _check_lambdas(lambdas)
    sq = right**2
    if kernel.form == "kxk":
        return np.stack([sq @ (1.0 / (kernel.eigvals + lam)) for lam in lams])
    return np.stack([sq @ (kernel.eigvals / (kernel.eigvals + lam)) for lam in lams])


def merge_topk(
    values: np.ndarray | None, indices: np.ndarray | None, new_values: np.ndarray, new_indices: np.ndarray, top: int
) -> tuple[np.ndarray, np.ndarray]:
    """Running top-``top`` along the last axis: merge the best so far with a new shard's scores.

    Args:
        values, indices: (..., t) best scores so far and their train indices (None before the first shard).
        new_values: (..., n) scores of the new shard.
        new_indices: (n,) train indices of the new shard's columns.
        top: how many to keep.

    Returns:
        (values, indices) of shape (..., min(top, seen)), sorted by descending score (ties: lower index first).
    """
    new_idx = np.broadcast_to(np.asarray(new_indices, dtype=np.int64), new_values.shape)
    if values is None or indices is None:
        all_v, all_i = new_values, new_idx
    else:
        all_v = np.concatenate([values, new_values], axis=-1)
        all_i = np.concatenate([indices, new_idx], axis=-1)
    # lexsort's last key is the primary one: descending score, then ascending index for a stable order.
    order = np.lexsort((all_i, -all_v), axis=-1)[..., :top]
    return np.take_along_axis(all_v, order, axis=-1), np.take_along_axis(all_i, order, axis=-1)


def lambda_grid() -> list[float]:
    """The paper's 27 ridge values {1, 2, 5} x 10^j, j = -2..6, ascending (0.01 ... 5e6)."""
    # Parsing the decimal literal gives the correctly rounded double (2e-2, not 2 * 0.01).
    return [float(f"{mantissa}e{exp}") for exp in range(-2, 7) for mantissa in (1, 2, 5)]


def _check_form(form: str) -> None:
    if form not in _FORMS:
        raise ValueError(f"form: expected one of {_FORMS}, got {form!r}")


def _check_2d(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array, got shape {array.shape}")
    return array


def _check_lambdas(lambdas: Sequence[float]) -> np.ndarray:
    lams = np.asarray(lambdas, dtype=np.float64)
    if lams.ndim != 1 or lams.shape[0] == 0:
        raise ValueError(f"lambdas: expected a non-empty sequence of floats, got {lambdas!r}")
    if not np.all(np.isfinite(lams) & (lams > 0)):
        raise ValueError(f"lambdas: every value must be finite and > 0, got {lambdas!r}")
    return lams
