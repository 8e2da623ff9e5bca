"""The objective of one trial as plain functions of arrays (no Ray, no store): the held-out split
that chooses lambda, and the LDS of a feature set over the lambda grid."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dtrak_ray.core.kernel import fit_kernel, scores_for_lambdas
from dtrak_ray.core.lds import lds, lds_per_sample
from dtrak_ray.errors import ConfigError


# ---- the held-out split ------------------------------------------------------------------------
@dataclass(frozen=True)
class HeldoutSplit:
    """Which part of a test set chooses lambda. ``by`` is "samples" (columns of tau and outputs) or
    "subsets" (rows of masks and outputs); ``select`` and ``heldout`` are disjoint index arrays."""

    by: str
    select: np.ndarray
    heldout: np.ndarray

    def part(self, tau: np.ndarray, masks: np.ndarray, outputs: np.ndarray, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tau (m', N), masks (M', N), outputs (M', m')) restricted to the ``which`` part ("select" or "heldout")."""
        idx = self.select if which == "select" else self.heldout
        if self.by == "samples":
            return tau[idx], masks, outputs[:, idx]
        return tau, masks[idx], outputs[idx]


def heldout_split(by: str, n_test: int, n_subsets: int, fraction: float, seed: int) -> HeldoutSplit:
    """Seeded split of the test samples (``by="samples"``) or LDS subsets (``"subsets"``) into a
    selection part (``round(fraction * n)`` items) and a held-out part (the rest)."""
    n = n_test if by == "samples" else n_subsets
    # A Spearman correlation over fewer than 3 subsets is +-1 whatever the scores: no information.
    least = 1 if by == "samples" else 3
    n_sel = int(round(fraction * n))
    if n_sel < least or n - n_sel < least:
        what = f"{n} test samples" if by == "samples" else f"{n} LDS subsets"
        raise ConfigError(
            f"sweep.selection_fraction={fraction} splits {what} into {n_sel} + {n - n_sel}: each part needs at least {least}; "
            f"choose a fraction nearer 0.5{' or sweep.lambda_selection=samples' if by == 'subsets' else ''}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return HeldoutSplit(by, np.sort(perm[:n_sel]), np.sort(perm[n_sel:]))


# ---- the objective of one trial ----------------------------------------------------------------
def _best(curve: np.ndarray) -> int:
    """Index of the largest finite value (a lambda whose LDS is undefined never wins)."""
    return int(np.argmax(np.where(np.isfinite(curve), curve, -np.inf)))


def evaluate_features(
    phi_train: np.ndarray,
    phi_tests: Mapping[str, np.ndarray],
    masks: np.ndarray,
    outputs: Mapping[str, np.ndarray],
    lambdas: Sequence[float],
    splits: Mapping[str, HeldoutSplit],
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Held-out LDS of one feature set, for every test set.

    Args:
        phi_train: (N, k) train features.
        phi_tests: test set -> (m, k) features.
        masks: (M, N) LDS subset masks.
        outputs: test set -> (M, m) ground-truth losses (averaged over seeds).
        lambdas: L ridge values searched.
        splits: test set -> its :class:`HeldoutSplit`.
        resamples, seed: the bootstrap over subsets of the held-out LDS.

    Returns:
        Flat metrics, LDS in %: per test set ``s``: ``{s}_lambda`` (chosen on the selection part),
        ``{s}_lds_select`` (its LDS there), ``{s}_lds`` / ``{s}_lds_std`` (bootstrap mean and std of the
        held-out LDS at that lambda), ``{s}_lds_point`` (plain mean), ``{s}_lds_oracle`` and
        ``{s}_lambda_oracle`` (best lambda on the held-out part itself), ``{s}_curve_select`` and
        ``{s}_curve_heldout`` (mean LDS per lambda), plus ``kernel_form``.
    """
    kernel = fit_kernel(phi_train)  # one factorization for every lambda and test set
    out: dict[str, Any] = {"kernel_form": kernel.form, "lambdas": [float(v) for v in lambdas]}
    for s, phi_test in phi_tests.items():
        tau = scores_for_lambdas(kernel, phi_train, phi_test, lambdas)  # (L, m, N)
        split = splits[s]
        curves = {}
        for which in ("select", "heldout"):
            per = [lds_per_sample(*split.part(tau[i], masks, outputs[s], which)) for i in range(len(lambdas))]
            with np.errstate(all="ignore"):
                curves[which] = np.array([np.nanmean(p) if np.isfinite(p).any() else np.nan for p in per])
        chosen, oracle = _best(curves["select"]), _best(curves["heldout"])
        held = lds(*split.part(tau[chosen], masks, outputs[s], "heldout"), n_resamples=resamples, seed=seed)
        out |= {
            f"{s}_lambda": float(lambdas[chosen]),
            f"{s}_lds_select": 100 * float(curves["select"][chosen]),
            f"{s}_lds": 100 * held.boot_mean,
            f"{s}_lds_std": 100 * held.boot_std,
            f"{s}_lds_point": 100 * held.mean,
            f"{s}_lambda_oracle": float(lambdas[oracle]),
            f"{s}_lds_oracle": 100 * float(curves["heldout"][oracle]),
            f"{s}_curve_select": [None if np.isnan(v) else round(100 * float(v), 4) for v in curves["select"]],
            f"{s}_curve_heldout": [None if np.isnan(v) else round(100 * float(v), 4) for v in curves["heldout"]],
        }
    return out
