"""The sweep: held-out LDS over projection dimension k, timesteps K, output function f and lambda.

Runs on a finished run (``dtrak-ray run``): it needs the run's data, models, Gen set and LDS ground
truth, and reuses its features. One trial is one (f, K, k); lambda is searched inside the trial,
because one factorization of the training Gram matrix serves every lambda (core/kernel.py), so a
lambda grid costs a rescale per value rather than a trial per value.

Interface:
- :func:`evaluate_features` ``(phi_train, phi_tests, masks, outputs, lambdas, splits, ...) -> dict``: the
  objective of one trial as a plain function of arrays (no Ray, no store).
- :class:`HeldoutSplit` / :func:`heldout_split`: which test samples (or LDS subsets) choose lambda and
  which ones measure the LDS.
- :func:`run_trial` ``(params, inputs) -> dict``: read one (f, K) feature set from the store, keep its
  first k columns, call :func:`evaluate_features`. This is what a Ray Tune trial runs.
- :func:`ensure_features`: the feature sets the sweep needs, reused from the run where it has them,
  else computed by the featurize stage's actor code (:class:`dtrak_ray.stages.featurize.Featurizer`).
- :func:`run_sweep`: all of it, then ``results/sweep.json``, ``report/sweep.md`` and ``report/sweep.png``.

Held-out protocol (the objective). For each test set, a seeded split puts ``selection_fraction`` of
the test samples (``lambda_selection: samples``) or of the LDS subsets (``subsets``) in a selection
part; lambda is the grid value with the best mean LDS there, and the objective is the LDS at that
lambda on the other part, with a bootstrap over subsets. Both numbers are reported, with the oracle
value (best lambda on the held-out part itself, the paper's optimistic protocol) for reference.

Feature reuse. The Gaussian and Rademacher projectors draw P in fixed-width column tiles, so the first
k' columns of a k-projection ARE the k'-projection (tests check it): the largest k's features serve
every smaller k by their prefix. Other projectors (sjlt, trak-cuda) are featurized at each k.
"""

from __future__ import annotations

from dtrak_ray.sweep.common import MODEL, PREFIX_PROJECTORS, SPLITS, TEST_SETS
from dtrak_ray.sweep.driver import check_run, run_sweep
from dtrak_ray.sweep.features import compute_features, ensure_features, feature_identity, features_key, find_features, source_id
from dtrak_ray.sweep.objective import HeldoutSplit, evaluate_features, heldout_split
from dtrak_ray.sweep.report import best_line, sweep_figure, sweep_markdown, sweep_table
from dtrak_ray.sweep.trial import TrialInputs, run_trial

__all__ = [
    "MODEL", "PREFIX_PROJECTORS", "SPLITS", "TEST_SETS", "HeldoutSplit", "TrialInputs", "best_line", "check_run",
    "compute_features", "ensure_features", "evaluate_features", "feature_identity", "features_key", "find_features",
    "heldout_split", "run_sweep", "run_trial", "source_id", "sweep_figure", "sweep_markdown", "sweep_table",
]
