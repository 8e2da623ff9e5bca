"""Tests of dtrak_ray.core.kernel: eigendecomposed D-TRAK scores against a direct linear solve."""

from __future__ import annotations

import numpy as np
import pytest

from dtrak_ray.core.kernel import (
    KernelEig,
    KernelForm,
    choose_form,
    factorize,
    fit_kernel,
    gram,
    lambda_grid,
    scores_direct,
    scores_for_lambdas,
)

# Lambdas spanning well below to well above the Gram spectrum of the tiny features below.
LAMBDAS = [0.05, 1.0, 20.0, 1e3]
# (N, k): one case per regime, N < k picks "NxN" and N > k picks "kxk".
SHAPES = [(5, 12), (15, 6)]
M_TEST = 4


def _features(n: int, k: int, m: int = M_TEST, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)), rng.standard_normal((m, k))


def test_choose_form() -> None:
    assert choose_form(5, 12) == "NxN"
    assert choose_form(15, 6) == "kxk"
    # Equal sizes: either is as cheap; the k x k form is the default.
    assert choose_form(8, 8) == "kxk"
    with pytest.raises(ValueError, match="n_train"):
        choose_form(0, 4)
    with pytest.raises(ValueError, match="k"):
        choose_form(4, 0)


@pytest.mark.parametrize("form", ["kxk", "NxN"])
def test_gram_is_float64_from_float32(form: KernelForm) -> None:
    phi64, _ = _features(7, 5)
    phi32 = phi64.astype(np.float32)
    g = gram(phi32, form)
    p = phi32.astype(np.float64)
    expected = p.T @ p if form == "kxk" else p @ p.T
    assert g.dtype == np.float64
    assert g.shape == expected.shape
    np.testing.assert_allclose(g, expected, rtol=1e-12, atol=1e-12)


def test_factorize_reconstructs_and_clips() -> None:
    # Rank 3 in 6 dimensions: three eigenvalues are zero up to rounding, possibly slightly negative.
    rng = np.random.default_rng(1)
    phi = rng.standard_normal((3, 6))
    g = gram(phi, "kxk")
    eig = factorize(g, "kxk")
    assert eig.form == "kxk"
    assert eig.eigvals.shape == (6,) and eig.eigvecs.shape == (6, 6)
    assert np.all(eig.eigvals >= 0)
    np.testing.assert_allclose(eig.eigvecs @ np.diag(eig.eigvals) @ eig.eigvecs.T, g, atol=1e-10)
    np.testing.assert_allclose(eig.eigvecs.T @ eig.eigvecs, np.eye(6), atol=1e-12)


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("form", [None, "kxk", "NxN"])
def test_scores_for_lambdas_match_direct(n: int, k: int, form: KernelForm | None) -> None:
    phi, phi_test = _features(n, k)
    kernel = fit_kernel(phi, form)
    assert kernel.form == (form or choose_form(n, k))
    scores = scores_for_lambdas(kernel, phi, phi_test, LAMBDAS)
    assert scores.shape == (len(LAMBDAS), M_TEST, n)
    assert scores.dtype == np.float64
    for idx, lam in enumerate(LAMBDAS):
        expected = scores_direct(phi, phi_test, lam)
        assert expected.shape == (M_TEST, n)
        np.testing.assert_allclose(scores[idx], expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_nxn_form_equals_kxk_form(n: int, k: int) -> None:
    phi, phi_test = _features(n, k, seed=2)
    by_k = scores_for_lambdas(fit_kernel(phi, "kxk"), phi, phi_test, LAMBDAS)
    by_n = scores_for_lambdas(fit_kernel(phi, "NxN"), phi, phi_test, LAMBDAS)
    np.testing.assert_allclose(by_n, by_k, rtol=1e-8, atol=1e-10)


def test_scores_accept_float32_features() -> None:
    phi, phi_test = _features(15, 6, seed=3)
    phi32, test32 = phi.astype(np.float32), phi_test.astype(np.float32)
    scores = scores_for_lambdas(fit_kernel(phi32), phi32, test32, [1.0])
    assert scores.dtype == np.float64
    expected = scores_direct(phi32.astype(np.float64), test32.astype(np.float64), 1.0)
    np.testing.assert_allclose(scores[0], expected, rtol=1e-8, atol=1e-10)


def test_lambda_grid() -> None:
    grid = lambda_grid()
    assert len(grid) == 27
    assert all(isinstance(value, float) for value in grid)
    assert all(a < b for a, b in zip(grid, grid[1:], strict=False))
    assert grid[0] == 0.01
    assert grid[-1] == 5e6
    assert grid[:6] == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
    assert grid[-3:] == [1e6, 2e6, 5e6]
    expected = [m * 10.0**j for j in range(-2, 7) for m in (1, 2, 5)]
    np.testing.assert_allclose(grid, expected, rtol=1e-15)


@pytest.mark.parametrize("bad", [[0.0], [-1.0], [1.0, float("nan")], [float("inf")], []])
def test_bad_lambdas_raise(bad: list[float]) -> None:
    phi, phi_test = _features(5, 12)
    kernel = fit_kernel(phi)
    with pytest.raises(ValueError, match="lambdas"):
        scores_for_lambdas(kernel, phi, phi_test, bad)


@pytest.mark.parametrize("lam", [0.0, -2.0, float("nan")])
def test_scores_direct_bad_lambda_raises(lam: float) -> None:
    phi, phi_test = _features(5, 12)
    with pytest.raises(ValueError, match="lam"):
        scores_direct(phi, phi_test, lam)


@pytest.mark.parametrize("form", ["kxk", "NxN"])
def test_mismatched_k_raises(form: KernelForm) -> None:
    phi, _ = _features(5, 12)
    kernel = fit_kernel(phi, form)
    wrong_test = np.ones((M_TEST, 11))
    with pytest.raises(ValueError, match="phi_test"):
        scores_for_lambdas(kernel, phi, wrong_test, [1.0])
    with pytest.raises(ValueError, match="phi_test"):
        scores_direct(phi, wrong_test, 1.0)


def test_kernel_size_mismatch_raises() -> None:
    phi, phi_test = _features(5, 12)
    # NxN kernel fitted on 5 train rows, then given 6: N disagrees.
    nxn = fit_kernel(phi, "NxN")
    more_rows = np.vstack([phi, phi[:1]])
    with pytest.raises(ValueError, match="kernel"):
        scores_for_lambdas(nxn, more_rows, phi_test, [1.0])
    # kxk kernel for k = 12 used with k = 10 features: k disagrees.
    kxk = fit_kernel(phi, "kxk")
    with pytest.raises(ValueError, match="kernel"):
        scores_for_lambdas(kxk, phi[:, :10], phi_test[:, :10], [1.0])


def test_bad_shapes_and_forms_raise() -> None:
    with pytest.raises(ValueError, match="phi"):
        gram(np.ones(4), "kxk")
    with pytest.raises(ValueError, match="form"):
        gram(np.ones((2, 3)), "kk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gram_matrix"):
        factorize(np.ones((2, 3)), "kxk")
    with pytest.raises(ValueError, match="phi_train"):
        fit_kernel(np.ones(3))
    with pytest.raises(ValueError, match="eigvecs"):
        KernelEig(form="kxk", eigvals=np.ones(3), eigvecs=np.eye(2))
