"""Ray Tune for the sweep: a grid of trials, each a plain function of (params, shared inputs).

``tune_grid(trial_fn, inputs, space, metric, resources, storage_path, name)`` runs one Tune trial per
point of the Cartesian product of ``space`` (``{name: [values]}``). ``trial_fn(params, inputs) -> dict``
is Ray-free (dtrak_ray/sweep/); the trainable here only calls it and reports its dict with
``ray.tune.report`` (``ray.train.report`` is an error inside Tune). ``inputs`` goes to the object
store once (``tune.with_parameters``), not into every trial's closure. Each trial asks for one
worker's CPUs and at most ``resources.workers`` run at once, so trials are sized like the other
stages' workers. Tune keeps its experiment folder under ``storage_path`` (the run's store when it
is local) or, when None, in a temporary directory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ray import tune

from dtrak_ray.distributed.cluster import Resources
from dtrak_ray.errors import DtrakError


class TuneTrialError(DtrakError, RuntimeError):
    """One or more Tune trials raised."""


def _trainable(config: dict[str, Any], trial_fn: Callable[[Mapping[str, Any], Any], dict[str, Any]], inputs: Any) -> None:
    tune.report(trial_fn(config, inputs))


def tune_grid(
    trial_fn: Callable[[Mapping[str, Any], Any], dict[str, Any]],
    inputs: Any,
    space: Mapping[str, Sequence[Any]],
    metric: str,
    resources: Resources,
    storage_path: str | None,
    name: str,
    mode: str = "max",
    verbose: int = 1,
) -> list[dict[str, Any]]:
    """Run every grid point of ``space`` as a Tune trial; returns each trial's reported metrics, in grid order.

    Raises :class:`TuneTrialError` naming the failed trials' parameters and first error.
    """
    trainable = tune.with_parameters(_trainable, trial_fn=trial_fn, inputs=inputs)
    trainable = tune.with_resources(trainable, {"cpu": resources.cpus})
    tuner = tune.Tuner(
        trainable,
        param_space={key: tune.grid_search(list(values)) for key, values in space.items()},
        # reuse_actors: a trial's process (its imports, numpy/scipy warm) serves the next trial.
        tune_config=tune.TuneConfig(metric=metric, mode=mode, max_concurrent_trials=max(1, resources.workers), reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path or tempfile.mkdtemp(prefix="dtrak-tune-"),
            verbose=verbose,
            failure_config=tune.FailureConfig(max_failures=1),  # a lost worker reruns its trial once; a bug fails fast
        ),
    )
    grid = tuner.fit()
    if grid.errors:
        failed = [r for r in grid if r.error is not None]
        params = ", ".join(str({k: r.config.get(k) for k in space}) for r in failed[:4])
        raise TuneTrialError(f"{len(failed)} of {len(grid)} sweep trials failed ({params}): {grid.errors[0]}")
    out = []
    for result in grid:
        metrics = dict(result.metrics or {})
        out.append({k: v for k, v in metrics.items() if k not in _TUNE_FIELDS} | {k: result.config[k] for k in space})
    return out


# Bookkeeping Tune adds to every report; the sweep's records keep only the trial's own metrics.
_TUNE_FIELDS = frozenset({
    "timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date", "time_this_iter_s",
    "time_total_s", "pid", "hostname", "node_ip", "config", "time_since_restore", "iterations_since_restore",
    "experiment_tag",
})
