"""Linear Datamodeling Score (LDS) of attribution scores against retrained-subset outputs (SPEC.md 3).

Interface:
- ``predictions(scores, masks) -> (M, m)``: the linear datamodel's predicted output per subset.
- ``spearman_columns(a, b) -> (m,)``: Spearman rank correlation of each column pair of two (M, m) arrays.
- ``lds_per_sample(scores, masks, outputs) -> (m,)``: LDS of each test sample.
- ``lds(scores, masks, outputs, n_resamples=64, seed=0) -> LDSResult``: mean LDS and its bootstrap
  over subsets.

Maths. M training subsets are boolean masks S (M x N); tau (m x N) holds the scores of the N train
samples for m test samples; outputs Y (M x m) hold, for each subset j, the loss on test sample i of
the model retrained on subset j. The prediction is

    pred[j, i] = sum_{n in S_j} -tau[i, n],   i.e.  pred = -(S tau^T)            (M x m)

(negative because Y is a loss: a helpful train sample lowers it). Then

    LDS(i) = Spearman_j(pred[j, i], Y[j, i]),   LDS = mean_i LDS(i)   (the caller reports x100, in %).

The uncertainty is a bootstrap over the M subsets: draw M subsets with replacement, recompute the
mean LDS, and report the mean and standard deviation of that distribution.

Pure numpy/scipy: no torch, no Ray, no I/O.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.stats


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on ndarrays is ambiguous
class LDSResult:
    """LDS of one score matrix.

    Attributes:
        mean: nanmean over test samples of the per-sample LDS, in [-1, 1] (nan if every sample is).
        boot_mean: mean of the bootstrap distribution of ``mean`` over resampled subsets.
        boot_std: standard deviation (ddof=1, scipy's ``standard_error``) of that distribution.
        per_sample: (m,) LDS of each test sample; nan where a column is constant.
    """

    mean: float
    boot_mean: float
    boot_std: float
    per_sample: np.ndarray


def predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Linear datamodel predictions pred = -(masks @ scores^T).

    Args:
        scores: (m, N) attribution scores tau.
        masks: (M, N) boolean subset membership (0/1 numbers are accepted too).

    Returns:
        (M, m) float64; ``[j, i]`` = -sum of scores[i, n] over the train samples n in subset j.
    """
    scores, masks = _check_scores_masks(scores, masks)
    return -(masks.astype(np.float64) @ scores.astype(np.float64).T)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of a[:, i] with b[:, i] for every column i.

    Ranks each column (ties get their average rank, as in ``scipy.stats.spearmanr``), then takes the
    Pearson correlation of the ranks:  rho_i = <ra_i - mean, rb_i - mean> / (|ra_i - mean| |rb_i - mean|).

    Args:
        a, b: (M, m) arrays of the same shape.

    Returns:
        (m,) float64; nan where either column is constant (its rank variance is zero) or holds a nan.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 2:
        raise ValueError(f"a: expected shape (M, m), got {a.shape}")
    if b.shape != a.shape:
        raise ValueError(f"b: expected shape {a.shape} to match a, got {b.shape}")
    ra = scipy.stats.rankdata(a, axis=0)
    rb = scipy.stats.rankdata(b, axis=0)
    ra = ra - ra.mean(axis=0)
    rb = rb - rb.mean(axis=0)
    num = np.sum(ra * rb, axis=0)
    den = np.sqrt(np.sum(ra * ra, axis=0) * np.sum(rb * rb, axis=0))
    rho = np.full(a.shape[1], np.nan, dtype=np.float64)
    # A constant column has zero rank variance: the correlation is undefined, not 0.
    ok = den > 0
    rho[ok] = num[ok] / den[ok]
    # Rounding can push |rho| a hair past 1 for perfectly (anti-)monotone columns.
    return np.clip(rho, -1.0, 1.0)


def lds_per_sample(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """LDS of each test sample: Spearman across subsets of ``predictions(scores, masks)`` vs ``outputs``.

    Args:
        scores: (m, N) attribution scores.
        masks: (M, N) boolean subset membership.
        outputs: (M, m) loss of the model retrained on subset j, evaluated on test sample i.

    Returns:
        (m,) float64 in [-1, 1], nan where a column is constant.
    """
    scores, masks, outputs = _check_all(scores, masks, outputs)
    return spearman_columns(predictions(scores, masks), outputs)


def lds(
    scores: np.ndarray,
    masks: np.ndarray,
    outputs: np.ndarray,
    n_resamples: int = 64,
    seed: int = 0,
) -> LDSResult:
    """Mean LDS over test samples, with a bootstrap over the M subsets.

    The bootstrap statistic on a resample of subset indices J (length M, with replacement) is
    nanmean_i Spearman(pred[J, i], outputs[J, i]); ``scipy.stats.bootstrap`` draws ``n_resamples``
    of them from ``np.random.default_rng(seed)``, so a fixed seed gives the same distribution.

    Args:
        scores: (m, N) attribution scores.
        masks: (M, N) boolean subset membership, M >= 2.
        outputs: (M, m) retrained-model losses.
        n_resamples: bootstrap resamples (the paper uses 64).
        seed: seed of the bootstrap generator.

    Returns:
        :class:`LDSResult`; the caller multiplies by 100 to report %.
    """
    scores, masks, outputs = _check_all(scores, masks, outputs)
    n_subsets = masks.shape[0]
    if n_subsets < 2:
        raise ValueError(f"masks: the bootstrap needs M >= 2 subsets, got shape {masks.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples: expected >= 1, got {n_resamples}")

    # Predictions do not change under resampling of subsets: compute them once, index rows after.
    pred = predictions(scores, masks)
    per_sample = spearman_columns(pred, outputs)

    def statistic(idx: np.ndarray) -> float:
        return _nanmean(spearman_columns(pred[idx], outputs[idx]))

    res = scipy.stats.bootstrap(
        (np.arange(n_subsets),),
        statistic,
        n_resamples=n_resamples,
        vectorized=False,
        method="percentile",
        # ``random_state`` rather than its newer alias ``rng`` (SciPy >= 1.15): the project supports
        # SciPy >= 1.11, and both draw the same resamples from the same Generator.
        random_state=np.random.default_rng(seed),
    )
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    with warnings.catch_warnings():
        # One resample leaves no spread: std is nan by definition, not a warning-worthy event.
        warnings.simplefilter("ignore", RuntimeWarning)
        boot_std = float(np.nanstd(dist, ddof=1))
    per_sample.setflags(write=False)
    return LDSResult(
        mean=_nanmean(per_sample),
        boot_mean=_nanmean(dist),
        boot_std=boot_std,
        per_sample=per_sample,
    )


def _nanmean(values: np.ndarray) -> float:
    # All-nan input (every column constant) is a legitimate nan result, not a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def _check_scores_masks(scores: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    masks = np.asarray(masks)
    if scores.ndim != 2:
        raise ValueError(f"scores: expected shape (m, N), got {scores.shape}")
    n_train = scores.shape[1]
    if masks.ndim != 2 or masks.shape[1] != n_train:
        raise ValueError(f"masks: expected shape (M, N) = (M, {n_train}) with N from scores, got {masks.shape}")
    return scores, masks


def _check_all(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores, masks = _check_scores_masks(scores, masks)
    outputs = np.asarray(outputs)
    expected = (masks.shape[0], scores.shape[0])
    if outputs.shape != expected:
        raise ValueError(f"outputs: expected shape (M, m) = {expected} with M from masks and m from scores, got {outputs.shape}")
    return scores, masks, outputs
