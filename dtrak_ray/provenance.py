"""Provenance checks: refuse to combine arrays that were made differently.

Every array dtrak-ray stores carries its provenance as attributes (see ``stages.common.provenance``
and the featurize stage): output function, K, timestep strategy, noise scheme and seed, projector
kind, seed and k, model digest, dataset, code version. Scoring combines train features with test
features, and evaluation combines scores with the LDS ground truth; if one of them was made by an
older config, copied from another run or edited by hand, the result is meaningless but silent. The
checks here compare the attributes of the arrays about to be combined and raise
:class:`~dtrak_ray.errors.ProvenanceError` naming *every* field that differs and each array's value.

- :func:`differences` lists the differing fields (a field recorded by no array is not compared; a
  field recorded by some arrays and not others is a difference: it says "not recorded").
- :func:`check_same` raises on any difference among several arrays.
- :func:`check_expected` raises when an array's attributes differ from the values the run expects
  (say, the digest of the model now in the store).
- :func:`check_rows` raises when an axis length differs from the length it must match.
- :func:`indices_digest` is the digest of dataset indices, for arrays that record them.

No Ray here, and no store access: callers pass the attributes they read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dtrak_ray.errors import ProvenanceError

# What makes two feature arrays of one (output function, K) comparable: the same gradients of the
# same model, projected by the same matrix, on the same dataset.
FEATURE_FIELDS: tuple[str, ...] = (
    "output_function", "K", "timestep_strategy", "timestep_seed", "noise", "noise_seed",
    "projector", "projector_seed", "k", "model", "model_digest", "dtype", "dataset", "indices_digest",
)
# Test features made by another featurizer (Journey-TRAK's generation trajectory, another output
# function) still have to be projected by the same matrix from gradients of the same model.
PROJECTION_FIELDS: tuple[str, ...] = ("projector", "projector_seed", "k", "model_digest", "dtype", "dataset")
# Scores and the LDS ground truth must describe the same test set of the same dataset.
SCORES_VS_OUTPUTS_FIELDS: tuple[str, ...] = ("test_set", "dataset", "indices_digest")

NOT_RECORDED = "not recorded"
_MISSING = object()


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _norm(value: Any) -> str:
    # Attributes come back from JSON: lists where tuples went in, ints where numpy ints went in.
    return json.dumps(value, sort_keys=True, default=_plain)


def differences(named: Mapping[str, Mapping[str, Any]], fields: Sequence[str], strict: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """Fields on which the arrays differ, each with every array's value (``"not recorded"`` if absent).

    ``named`` maps a name for each array (its store key, say) to its attributes. A field no array
    records is skipped; one that only some record is a difference when ``strict``, else skipped.
    """
    out = []
    for field in fields:
        values = {name: attrs.get(field, _MISSING) for name, attrs in named.items()}
        present = [v for v in values.values() if v is not _MISSING]
        if not present or (not strict and len(present) < len(values)):
            continue
        if len({_norm(v) for v in values.values() if v is not _MISSING}) > 1 or len(present) < len(values):
            out.append((field, {n: (NOT_RECORDED if v is _MISSING else v) for n, v in values.items()}))
    return out


def _describe(diffs: list[tuple[str, dict[str, Any]]]) -> str:
    lines = []
    for field, values in diffs:
        lines.append(f"  {field}: " + " vs ".join(f"{v!r} ({name})" for name, v in values.items()))
    return "\n".join(lines)


def check_same(named: Mapping[str, Mapping[str, Any]], fields: Sequence[str], action: str, fix: str, strict: bool = True) -> None:
    """Raise ProvenanceError if the arrays in ``named`` differ on any of ``fields``.

    ``action`` says what was about to happen ("score val against train features"), ``fix`` what the
    user can do; both go into the message, after one line per differing field.
    """
    diffs = differences(named, fields, strict)
    if diffs:
        raise ProvenanceError(
            f"refusing to {action}: the arrays were made differently ({', '.join(f for f, _ in diffs)} differ):\n"
            f"{_describe(diffs)}\n{fix}"
        )


def check_expected(name: str, attrs: Mapping[str, Any], expected: Mapping[str, Any], action: str, fix: str) -> None:
    """Raise ProvenanceError if ``attrs`` (of array ``name``) differ from the ``expected`` values."""
    check_same({name: attrs, "expected by this run": expected}, list(expected), action, fix)


def check_rows(name: str, length: int, other: str, expected: int, action: str, fix: str) -> None:
    """Raise ProvenanceError if an array's axis length differs from the one it must match."""
    if int(length) != int(expected):
        raise ProvenanceError(f"refusing to {action}: {name} has {length} rows but {other} has {expected}\n{fix}")


def indices_digest(indices: np.ndarray) -> str:
    """A short digest of dataset indices (order matters), for arrays that record which samples they hold."""
    arr = np.ascontiguousarray(np.asarray(indices, dtype=np.int64))
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


FEATURES_FIX = (
    "One of them is stale (written by another config or copied from elsewhere): recompute the features with "
    "`dtrak-ray featurize CONFIG` after deleting the odd one out and the featurize stage marker, or start a new run (--set name=NEW)."
)
OUTPUTS_FIX = (
    "Scores and ground truth must come from the same run and test set: rerun `dtrak-ray outputs` and `dtrak-ray score` "
    "on this run (after deleting the stale array and its stage marker), or start a new run (--set name=NEW)."
)


def check_features_pair(train_name: str, train_attrs: Mapping[str, Any], test_name: str, test_attrs: Mapping[str, Any],
                        same_featurizer: bool = True) -> None:
    """Refuse to score test features against train features made differently.

    ``same_featurizer`` False (Journey-TRAK, another output function on the test side) compares only
    what the projection needs (:data:`PROJECTION_FIELDS`).
    """
    fields = FEATURE_FIELDS if same_featurizer else PROJECTION_FIELDS
    named = {train_name: train_attrs, test_name: test_attrs}
    check_same(named, fields, f"score {test_name} against {train_name}", FEATURES_FIX, strict=same_featurizer)


def check_scores_vs_ground_truth(scores_name: str, scores_attrs: Mapping[str, Any], scores_shape: Sequence[int], outputs_name: str,
                                 outputs_attrs: Mapping[str, Any], n_outputs: int, n_train: int) -> None:
    """Refuse to evaluate scores (L, m, N) against ground truth of another test set, dataset or size."""
    action = f"evaluate {scores_name} against {outputs_name}"
    # Not strict: scores of some baselines record less than the kernel scores; what both record must agree.
    check_same({scores_name: scores_attrs, outputs_name: outputs_attrs}, SCORES_VS_OUTPUTS_FIELDS, action, OUTPUTS_FIX, strict=False)
    check_rows(f"{scores_name} (axis 1, test samples)", scores_shape[1], outputs_name, n_outputs, action, OUTPUTS_FIX)
    check_rows(f"{scores_name} (axis 2, train samples)", scores_shape[2], "the LDS subset masks", n_train, action, OUTPUTS_FIX)
