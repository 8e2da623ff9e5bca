"""Running plain Python work on Ray workers, with backpressure and one progress bar.

- ``map_tasks(fn, items, res)``: one Ray task per item, at most ``res.workers`` in flight.
  For work that loads its own inputs (training a model, one ground-truth evaluation).
- ``map_actors(factory, items, res)``: a pool of actors, each building ``factory()`` once (say, a
  featurizer holding a model and a projection matrix) and calling it on many items.
Functions and factories are plain, Ray-free objects from the stages; results are small (the work
writes its outputs to the store itself). A failed item raises in the driver after the items in
flight finish, so nothing already written is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import ray
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dtrak_ray.distributed.cluster import Resources

T = TypeVar("T")


def _progress(desc: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{desc}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
    )


def prepare_worker(threads: int) -> None:
    """Torch threads of a worker, and an allocator that keeps per-batch buffers (dtrak_ray.allocator)."""
    import torch

    from dtrak_ray.allocator import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()


@ray.remote
def _run_task(fn: Callable[[Any], Any], item: Any, threads: int) -> Any:
    prepare_worker(threads)
    return fn(item)


@ray.remote
class _Actor:
    def __init__(self, factory: Callable[[], Callable[[Any], Any]], threads: int):
        prepare_worker(threads)
        self.worker = factory()

    def __call__(self, item: Any) -> Any:
        return self.worker(item)


def _drain(
    submit: Callable[[Any], Any],
    items: Sequence[Any],
    limit: int,
    desc: str,
    weight: Callable[[Any], int],
    unit: str,
    on_ready: Callable[[Any], None] = lambda ref: None,
) -> list[Any]:
    results: dict[int, Any] = {}
    pending: dict[Any, int] = {}
    queue = list(enumerate(items))
    total = sum(weight(it) for it in items)
    errors: list[BaseException] = []
    with _progress(desc) as bar:
        task = bar.add_task(desc, total=total, rate="")
        while queue or pending:
            while queue and len(pending) < limit and not errors:
                i, item = queue.pop(0)
                pending[submit(item)] = i
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                on_ready(ref)
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - re-raised below once in-flight work settles
                    errors.append(exc)
                    continue
                bar.advance(task, weight(items[i]))
                done = bar.tasks[0].completed
                elapsed = bar.tasks[0].elapsed or 1e-9
                bar.update(task, rate=f"{done / elapsed:.1f} {unit}/s")
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(items))]


def map_tasks(
    fn: Callable[[T], Any], items: Sequence[T], res: Resources, desc: str, weight: Callable[[T], int] = lambda _: 1, unit: str = "items", max_retries: int = 3
) -> list[Any]:
    """Run ``fn(item)`` for every item as Ray tasks; returns results in item order."""
    fn_ref = ray.put(fn)
    remote = _run_task.options(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=max_retries)
    return _drain(lambda it: remote.remote(fn_ref, it, res.torch_threads), items, res.workers, desc, weight, unit)


def map_actors(
    factory: Callable[[], Callable[[T], Any]], items: Sequence[T], res: Resources, desc: str, weight: Callable[[T], int] = lambda _: 1, unit: str = "items"
) -> list[Any]:
    """Build ``res.workers`` actors from ``factory`` and feed them items as they free up."""
    n = max(1, min(res.workers, len(items)))
    actors = [
        _Actor.options(num_cpus=res.cpus, num_gpus=res.gpus, max_restarts=3, max_task_retries=3).remote(factory, res.torch_threads)
        for _ in range(n)
    ]
    free = list(actors)
    busy: dict[Any, Any] = {}

    def submit(item: Any) -> Any:
        actor = free.pop(0)
        ref = actor.__call__.remote(item)
        busy[ref] = actor
        return ref

    try:
        return _drain(submit, items, n, desc, weight, unit, on_ready=lambda ref: free.append(busy.pop(ref)))
    finally:
        for actor in actors:
            ray.kill(actor)
