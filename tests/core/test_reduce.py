"""Blocked reduction and scoring (dtrak_ray.core.kernel) against a direct dense computation, no Ray.

The blocked path is what the score stage runs shard by shard: partial Gram products summed in any
order, test blocks against train shards, and a running top-k. Each is checked against plain dense
numpy on the whole matrices, in both the k x k (N >= k) and N x N (N < k) forms.
"""

from __future__ import annotations

import numpy as np
import pytest

from dtrak_ray.core.kernel import (
    choose_form,
    factorize,
    gram,
    gram_partial,
    left_factor,
    merge_topk,
    right_factor,
    scores_block,
    scores_direct,
    self_influence,
)

LAMBDAS = [0.03, 1.0, 50.0]
# (N, k, shard): N >= k gives the k x k form, N < k the N x N form; shards do not divide N evenly.
CASES = [(23, 9, 5), (11, 30, 4)]


def _features(n: int, k: int, m: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # float32 like the stored features: the blocked path must accumulate in float64 anyway.
    return rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((m, k)).astype(np.float32)


def _tree_sum(parts: list[np.ndarray], fan_in: int) -> np.ndarray:
    while len(parts) > 1:
        parts = [sum(parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def _blocked_gram(phi: np.ndarray, form: str, step: int, fan_in: int) -> np.ndarray:
    n, k = phi.shape
    if form == "kxk":
        parts = [gram_partial(phi[s : s + step], form) for s in range(0, n, step)]
    else:
        parts = [gram_partial(phi[:, s : s + step], form) for s in range(0, k, step)]
    return _tree_sum(parts, fan_in)


def _blocked_scores(phi: np.ndarray, test: np.ndarray, step: int, test_block: int, scale: str = "none") -> tuple[np.ndarray, str]:
    n, k = phi.shape
    form = choose_form(n, k)
    kernel = factorize(_blocked_gram(phi, form, step, fan_in=3), form)
    out = np.empty((len(LAMBDAS), test.shape[0], n))
    for a in range(0, test.shape[0], test_block):
        tb = test[a : a + test_block]
        cross = None
        if form == "NxN":
            cross = np.concatenate([tb.astype(np.float64) @ phi[s : s + step].astype(np.float64).T for s in range(0, n, step)], axis=1)
        left = left_factor(kernel, tb, cross)
        for s in range(0, n, step):
            right = right_factor(kernel, phi[s : s + step], slice(s, min(s + step, n)))
            tau = scores_block(kernel, left, right, LAMBDAS)
            if scale == "relative":
                tau /= np.sqrt(self_influence(kernel, right, LAMBDAS))[:, None, :]
            out[:, a : a + test_block, s : s + step] = tau
    return out, form


@pytest.mark.parametrize(("n", "k", "step"), CASES)
def test_tree_of_partial_grams_equals_dense(n: int, k: int, step: int) -> None:
    phi, _ = _features(n, k)
    form = choose_form(n, k)
    p = phi.astype(np.float64)
    dense = p.T @ p if form == "kxk" else p @ p.T
    for fan_in in (2, 3, 7):
        np.testing.assert_allclose(_blocked_gram(phi, form, step, fan_in), dense, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(gram(phi, form), dense, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(("n", "k", "step"), CASES)
def test_blocked_scores_equal_direct_solve(n: int, k: int, step: int) -> None:
    phi, test = _features(n, k)
    got, form = _blocked_scores(phi, test, step, test_block=4)
    assert form == ("kxk" if n >= k else "NxN")
    for i, lam in enumerate(LAMBDAS):
        np.testing.assert_allclose(got[i], scores_direct(phi, test, lam), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(("n", "k", "step"), CASES)
def test_self_influence_and_relative_if_equal_direct(n: int, k: int, step: int) -> None:
    phi, test = _features(n, k)
    p, t = phi.astype(np.float64), test.astype(np.float64)
    got, _ = _blocked_scores(phi, test, step, test_block=6, scale="relative")
    for i, lam in enumerate(LAMBDAS):
        h_inv = np.linalg.inv(p.T @ p + lam * np.eye(k))
        self_inf = np.array([p[j] @ h_inv @ p[j] for j in range(n)])
        expected = (t @ h_inv @ p.T) / np.sqrt(self_inf)[None, :]
        np.testing.assert_allclose(got[i], expected, rtol=1e-6, atol=1e-9)


def test_merge_topk_equals_full_sort() -> None:
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((2, 5, 37))
    scores[0, 0, 10] = scores[0, 0, 20]  # a tie: the lower index comes first
    vals = idx = None
    for s in range(0, 37, 8):
        vals, idx = merge_topk(vals, idx, scores[..., s : s + 8], np.arange(s, min(s + 8, 37)), 6)
    order = np.lexsort((np.broadcast_to(np.arange(37), scores.shape), -scores), axis=-1)[..., :6]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(vals, np.take_along_axis(scores, order, axis=-1))


def test_blocked_api_refuses_bad_shapes() -> None:
    phi, test = _features(11, 30)
    kernel = factorize(gram(phi, "NxN"), "NxN")
    with pytest.raises(ValueError, match="cross"):
        left_factor(kernel, test)
    with pytest.raises(ValueError, match="rows"):
        right_factor(kernel, phi)
    kxk = factorize(gram(phi, "kxk"), "kxk")
    with pytest.raises(ValueError, match="phi_test"):
        left_factor(kxk, test[:, :5])
