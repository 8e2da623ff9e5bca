"""Tests of dtrak_ray.core.lds: predictions, per-column Spearman, LDS and its bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from dtrak_ray.core.lds import LDSResult, lds, lds_per_sample, predictions, spearman_columns


def _problem(n_subsets: int = 24, n_train: int = 10, n_test: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random masks and scores, with outputs a noisy linear datamodel so the LDS is clearly positive."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n_subsets, n_train)) < 0.5
    scores = rng.standard_normal((n_test, n_train))
    outputs = -(masks @ scores.T) + 0.5 * rng.standard_normal((n_subsets, n_test))
    return scores, masks, outputs


# Hand-made case: M = 4 subsets of N = 3 train samples, m = 3 test samples sharing one score row.
# Scores (1, 2, 4) and subsets {0}, {1}, {0, 1}, {2} give sums 1, 2, 3, 4, so pred = [-1, -2, -3, -4]
# for every test sample; pred ranks are [4, 3, 2, 1].
HAND_SCORES = np.array([[1.0, 2.0, 4.0]] * 3)
HAND_MASKS = np.array(
    [
        [True, False, False],
        [False, True, False],
        [True, True, False],
        [False, False, True],
    ]
)
HAND_OUTPUTS = np.array(
    [
        # col 0 falls with j like pred: rho = +1.
        # col 1 rises with j: rho = -1.
        # col 2 ranks [4, 2, 3, 1]: d = [0, 1, -1, 0], sum d^2 = 2, rho = 1 - 6*2/(4*15) = 0.8.
        [0.4, 0.1, 0.4],
        [0.3, 0.2, 0.2],
        [0.2, 0.3, 0.3],
        [0.1, 0.4, 0.1],
    ]
)


def test_predictions_match_loop() -> None:
    scores, masks, _ = _problem(n_subsets=6, n_train=7, n_test=3)
    expected = np.zeros((6, 3))
    for j in range(6):
        for i in range(3):
            for n in range(7):
                if masks[j, n]:
                    expected[j, i] -= scores[i, n]
    got = predictions(scores, masks)
    assert got.shape == (6, 3)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_predictions_hand_case() -> None:
    expected = np.array([[-1.0] * 3, [-2.0] * 3, [-3.0] * 3, [-4.0] * 3])
    np.testing.assert_array_equal(predictions(HAND_SCORES, HAND_MASKS), expected)


def test_spearman_columns_match_scipy_with_ties() -> None:
    rng = np.random.default_rng(3)
    # Small integer ranges force many ties in both arrays.
    a = rng.integers(0, 4, size=(12, 6)).astype(np.float64)
    b = rng.integers(0, 5, size=(12, 6)).astype(np.float64)
    got = spearman_columns(a, b)
    assert got.shape == (6,)
    for i in range(6):
        expected = scipy.stats.spearmanr(a[:, i], b[:, i]).statistic
        np.testing.assert_allclose(got[i], expected, rtol=1e-12, atol=1e-12)


def test_spearman_constant_column_is_nan() -> None:
    a = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]])
    b = np.array([[3.0, 1.0], [2.0, 2.0], [1.0, 3.0]])
    got = spearman_columns(a, b)
    assert got[0] == -1.0
    assert np.isnan(got[1])


def test_lds_hand_case() -> None:
    per_sample = lds_per_sample(HAND_SCORES, HAND_MASKS, HAND_OUTPUTS)
    np.testing.assert_allclose(per_sample, [1.0, -1.0, 0.8], rtol=0, atol=1e-12)
    result = lds(HAND_SCORES, HAND_MASKS, HAND_OUTPUTS, n_resamples=16)
    assert isinstance(result, LDSResult)
    # (1 - 1 + 0.8) / 3
    assert result.mean == pytest.approx(0.8 / 3, abs=1e-12)
    np.testing.assert_allclose(result.per_sample, [1.0, -1.0, 0.8], atol=1e-12)


def test_lds_single_perfect_sample() -> None:
    # Only column 0 of the hand case: perfectly attributed, LDS exactly 1.
    result = lds(HAND_SCORES[:1], HAND_MASKS, HAND_OUTPUTS[:, :1], n_resamples=8)
    assert result.mean == pytest.approx(1.0, abs=1e-12)
    assert lds_per_sample(HAND_SCORES[:1], HAND_MASKS, -HAND_OUTPUTS[:, :1])[0] == pytest.approx(-1.0)


def test_lds_nan_aware_mean() -> None:
    scores, masks, outputs = _problem()
    outputs = outputs.copy()
    outputs[:, 2] = 1.0  # a constant column: its LDS is undefined
    result = lds(scores, masks, outputs, n_resamples=8)
    assert np.isnan(result.per_sample[2])
    expected = np.mean(np.delete(result.per_sample, 2))
    assert result.mean == pytest.approx(expected, abs=1e-12)
    assert np.isfinite(result.boot_mean) and np.isfinite(result.boot_std)


def test_lds_bootstrap_finite_and_deterministic() -> None:
    scores, masks, outputs = _problem()
    first = lds(scores, masks, outputs, n_resamples=32, seed=7)
    again = lds(scores, masks, outputs, n_resamples=32, seed=7)
    other = lds(scores, masks, outputs, n_resamples=32, seed=8)

    assert first.mean == pytest.approx(np.nanmean(lds_per_sample(scores, masks, outputs)), abs=1e-12)
    # The planted linear signal makes the LDS clearly positive.
    assert first.mean > 0.5
    assert np.isfinite(first.boot_std) and first.boot_std > 0
    assert np.isfinite(first.boot_mean)
    assert abs(first.boot_mean - first.mean) < 5 * first.boot_std + 0.05

    assert (first.boot_mean, first.boot_std) == (again.boot_mean, again.boot_std)
    assert (first.boot_mean, first.boot_std) != (other.boot_mean, other.boot_std)


def test_per_sample_is_read_only() -> None:
    result = lds(*_problem(), n_resamples=4)
    with pytest.raises(ValueError):
        result.per_sample[0] = 0.0


def test_bad_shapes_raise() -> None:
    scores, masks, outputs = _problem(n_subsets=6, n_train=4, n_test=3)
    with pytest.raises(ValueError, match=r"scores: expected shape \(m, N\)"):
        predictions(scores[0], masks)
    with pytest.raises(ValueError, match=r"masks: expected shape \(M, N\) = \(M, 4\)"):
        predictions(scores, masks[:, :3])
    with pytest.raises(ValueError, match=r"masks"):
        lds_per_sample(scores, masks[0], outputs)
    with pytest.raises(ValueError, match=r"outputs: expected shape \(M, m\) = \(6, 3\)"):
        lds_per_sample(scores, masks, outputs.T)
    with pytest.raises(ValueError, match=r"outputs"):
        lds(scores, masks, outputs[:5])
    with pytest.raises(ValueError, match=r"b: expected shape"):
        spearman_columns(outputs, outputs[:, :2])
    with pytest.raises(ValueError, match=r"a: expected shape"):
        spearman_columns(outputs[:, 0], outputs[:, 0])
    with pytest.raises(ValueError, match=r"masks"):
        lds(scores, masks[:1], outputs[:1])
    with pytest.raises(ValueError, match=r"n_resamples"):
        lds(scores, masks, outputs, n_resamples=0)
