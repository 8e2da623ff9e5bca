"""D-TRAK scores for every ridge lambda from one eigendecomposition (SPEC.md section 2).

Interface:
- ``choose_form(n_train, k) -> "kxk" | "NxN"``: the smaller Gram matrix.
- ``gram(phi, form) -> (r, r)``: Phi^T Phi (kxk) or Phi Phi^T (NxN), float64.
- ``factorize(gram_matrix, form) -> KernelEig``: symmetric eigendecomposition, eigenvalues clipped at 0.
- ``fit_kernel(phi_train, form=None) -> KernelEig``: ``gram`` then ``factorize``.
- ``scores_for_lambdas(kernel, phi_train, phi_test, lambdas) -> (L, m, N)``: scores for a lambda sweep.
- ``scores_direct(phi_train, phi_test, lam) -> (m, N)``: the plain linear solve, a reference for tests.
- ``lambda_grid() -> list[float]``: the paper's 27 lambdas.

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
