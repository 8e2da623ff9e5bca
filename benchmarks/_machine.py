"""What the benchmarks share: how busy the machine is (ratios mean little on a loaded one), and best-of timing."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


def load_note() -> str:
    """One line: the 1-minute load average against the CPU count, with a warning when busy.

    With the kernel's ``sched_autogroup`` on, CPU time is shared fairly between sessions, not
    processes: a Ray driver and all its workers share one session's slice, so on a busy machine two
    workers get little more CPU than one and a scaling ratio says more about the neighbours.
    """
    cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return f"machine: {cpus} CPUs, load average unknown"
    line = f"machine: {cpus} CPUs, 1-minute load average {load:.1f} before this benchmark"
    if load > 0.75 * cpus:
        line += " (busy: other processes share the CPUs, so timings and ratios are noisy"
        autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
        if autogroup.exists() and autogroup.read_text().strip() == "1":
            line += "; sched_autogroup is on: this session's processes share one slice of CPU"
        line += ")"
    return line


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best of ``repeats`` calls of ``fn``, in seconds (the least disturbed by the neighbours)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warm_up: bool = True) -> dict[str, float]:
    """Best seconds of each contender over ``rounds`` rounds, each round calling every contender once.

    The load of other processes drifts over minutes; timing the sides one after the other lets that
    drift land on one side only, while interleaving spreads it over all of them.
    """
    if warm_up:
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {c: [] for c in contenders}
    for _ in range(rounds):
        for c, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[c].append(time.perf_counter() - t0)
    return {c: min(ts) for c, ts in times.items()}
