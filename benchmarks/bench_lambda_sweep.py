"""The lambda sweep: 27 lambdas from one eigendecomposition vs 27 separate solves, same run.

    .venv/bin/python -m benchmarks.bench_lambda_sweep [--n 3000] [--k 1536] [--m 64] [--repeats 2]

Both sides start from the same train features Phi (N x k) and test features (m x k), in float64,
and produce the same (27, m, N) scores for the paper's grid (checked: max relative difference).
(a) separate solves: the Gram matrix Phi^T Phi once, then for each lambda a Cholesky factorization
of Phi^T Phi + lambda I and a solve for the test features, times Phi^T: the fair per-lambda way;
(b) dtrak-ray: one symmetric eigendecomposition (``fit_kernel``), then every lambda is a rescale
and one product (``scores_for_lambdas``). The output itself (27 x m x N products) costs both the
same; the saving is the 27 k^3 factorizations, so it grows with k. The last line prints the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg

from dtrak_ray.core.kernel import fit_kernel, lambda_grid, scores_for_lambdas


def separate_solves(phi: np.ndarray, test: np.ndarray, lambdas: list[float]) -> np.ndarray:
    """One Cholesky solve per lambda (the Gram matrix is shared): (L, m, N)."""
    g = phi.T @ phi
    eye = np.eye(g.shape[0])
    out = np.empty((len(lambdas), test.shape[0], phi.shape[0]))
    for i, lam in enumerate(lambdas):
        c = scipy.linalg.cho_factor(g + lam * eye)
        out[i] = scipy.linalg.cho_solve(c, test.T).T @ phi.T
    return out


def one_factorization(phi: np.ndarray, test: np.ndarray, lambdas: list[float]) -> np.ndarray:
    return scores_for_lambdas(fit_kernel(phi, "kxk"), phi, test, lambdas)


def _best(fn, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="training samples N")
    ap.add_argument("--k", type=int, default=1536, help="feature dimension k (the k x k form: N >= k)")
    ap.add_argument("--m", type=int, default=64, help="test samples (one scoring block)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # Features with a decaying spectrum, like projected gradients: the lambda grid then spans it.
    scales = np.logspace(0, -3, args.k)
    phi = rng.standard_normal((args.n, args.k)) * scales
    test = rng.standard_normal((args.m, args.k)) * scales
    lambdas = lambda_grid()
    print(f"N = {args.n}, k = {args.k}, m = {args.m}, {len(lambdas)} lambdas, float64, best of {args.repeats}")
    t_sep, a = _best(lambda: separate_solves(phi, test, lambdas), args.repeats)
    t_eig, b = _best(lambda: one_factorization(phi, test, lambdas), args.repeats)
    rel = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    print(f"max |difference| / max |score| = {rel:.1e}")
    print(f"separate solves (27 Cholesky):      {t_sep:8.2f} s")
    print(f"one eigendecomposition (dtrak-ray): {t_eig:8.2f} s")
    print(f"ratio separate / one factorization = {t_sep / t_eig:.2f}x")


if __name__ == "__main__":
    main()
