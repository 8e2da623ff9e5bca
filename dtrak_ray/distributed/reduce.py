"""Tree reduction on Ray: partial results computed where the data is, summed in a tree of tasks.

- ``tree_sum(leaf, items, res, desc)``: runs ``leaf(item)`` as one Ray task per item (each task reads
  its own shard from the store, so no feature data passes through the driver) and sums the returned
  arrays with a tree of Ray tasks, ``fan_in`` partials at a time, as they finish. Only the final sum
  comes back to the driver.

Memory: at most ``res.workers`` leaves are in flight and each sum task replaces ``fan_in`` partials
by one, so the object store holds O(workers + fan_in) partials of the result's size (k x k for a
Gram matrix), whatever the number of shards N / shard size.
Addition is associative, so the result equals a serial sum up to floating-point rounding
(the tests compare it with a direct dense computation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import ray

from dtrak_ray.distributed.cluster import Resources
from dtrak_ray.distributed.pool import _progress, prepare_worker

T = TypeVar("T")


@ray.remote
def _leaf(fn: Callable[[Any], np.ndarray], item: Any, threads: int) -> np.ndarray:
    prepare_worker(threads)
    return np.asarray(fn(item))


@ray.remote
def _add(*parts: np.ndarray) -> np.ndarray:
    # Arguments that are ObjectRefs arrive resolved (zero-copy read-only views): sum into a new array.
    out = np.array(parts[0], copy=True)
    for p in parts[1:]:
        out += p
    return out


def tree_sum(
    leaf: Callable[[T], np.ndarray],
    items: Sequence[T],
    res: Resources,
    desc: str,
    fan_in: int = 4,
    unit: str = "shards",
) -> np.ndarray:
    """Sum of ``leaf(item)`` over ``items``, computed as Ray tasks and reduced as a tree.

    Args:
        leaf: a plain (Ray-free, picklable) function from an item (a shard description) to an array;
            every item must give the same shape.
        items: the shards.
        res: worker sizing: at most ``res.workers`` leaves in flight, each with ``res.cpus`` CPUs.
        desc: progress-bar label.
        fan_in: partials summed by one task (>= 2).

    Returns:
        The sum, on the driver.
    """
    if not items:
        raise ValueError("tree_sum: no items to reduce")
    if fan_in < 2:
        raise ValueError(f"fan_in: expected >= 2, got {fan_in}")
    leaf_ref = ray.put(leaf)
    leaf_remote = _leaf.options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=3)
    add_remote = _add.options(num_cpus=res.cpus, max_retries=3)
    queue = list(items)
    leaves: set[Any] = set()
    sums: set[Any] = set()
    ready: list[Any] = []  # finished partials (leaves or sums) waiting to be combined
    limit = max(1, res.workers)
    with _progress(desc) as bar:
        task = bar.add_task(desc, total=len(items), rate="")
        while queue or leaves or sums or len(ready) > 1:
            while queue and len(leaves) + len(sums) < limit:
                leaves.add(leaf_remote.remote(leaf_ref, queue.pop(0), res.torch_threads))
            # Combine as soon as fan_in partials are ready, or whatever is left once nothing else runs.
            while len(ready) >= fan_in or (len(ready) > 1 and not queue and not leaves and not sums):
                group, ready = ready[:fan_in], ready[fan_in:]
                sums.add(add_remote.remote(*group))
            pending = list(leaves | sums)
            if not pending:
                continue
            done, _ = ray.wait(pending, num_returns=1)
            for ref in done:
                # Not fetched here: a failed leaf fails the sums above it, and the final get raises it.
                if ref in leaves:
                    leaves.discard(ref)
                    bar.advance(task, 1)
                else:
                    sums.discard(ref)
                ready.append(ref)
    return np.asarray(ray.get(ready[0]))
