"""One Tune trial: read one stored (f, K) feature set, keep its first k columns, evaluate."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dtrak_ray.config import ExperimentConfig
from dtrak_ray.storage import RunStore
from dtrak_ray.sweep.common import PREFIX_PROJECTORS, SPLITS
from dtrak_ray.sweep.features import features_key, source_id
from dtrak_ray.sweep.objective import HeldoutSplit, evaluate_features


# ---- one trial, reading the store --------------------------------------------------------------
@dataclass(frozen=True)
class TrialInputs:
    """What every trial shares (shipped once to the object store by Tune's ``with_parameters``)."""

    run: RunStore
    cfg: ExperimentConfig
    masks: np.ndarray
    outputs: dict[str, np.ndarray]
    lambdas: tuple[float, ...]
    splits: dict[str, HeldoutSplit]
    sources: dict[str, int] = field(default_factory=dict)  # "f/K" (k per trial for non-prefix projectors: "f/K/k") -> stored k


def run_trial(params: Mapping[str, Any], inputs: TrialInputs) -> dict[str, Any]:
    """One (f, K, k): the first k columns of the stored features, then :func:`evaluate_features`."""
    f, K, k = str(params["f"]), int(params["K"]), int(params["k"])
    cfg = inputs.cfg
    prefix = cfg.features.projector in PREFIX_PROJECTORS
    k_src = inputs.sources[source_id(f, K) if prefix else source_id(f, K, k)]
    phis = {}
    for split in SPLITS:
        arr = inputs.run.open_array(features_key(inputs.run, cfg, split, f, K, k_src))
        phis[split] = np.asarray(arr[:, :k], dtype=np.float64)
    metrics = evaluate_features(
        phis.pop("train"), phis, inputs.masks, inputs.outputs, inputs.lambdas, inputs.splits, cfg.lds.bootstrap_resamples, cfg.seed
    )
    return {"f": f, "K": K, "k": k, "k_source": k_src,
            "objective": metrics[f"{cfg.sweep.objective}_lds"], **metrics}
