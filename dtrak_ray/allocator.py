"""Keep freed tensor memory in the process instead of handing it back to the OS after every batch.

Per-sample gradients allocate and free tensors of tens of MB at every micro-batch. glibc serves
such sizes with ``mmap`` and unmaps them on free, so every batch faults its memory in again, page
by page: on a CPU worker that measured ~10k minor faults and 10-15% of the featurize time (see
benchmarks/bench_featurize.py). Raising glibc's mmap and trim thresholds makes those sizes come
from the heap and stay there for the next batch. The cost is a resident size that stays at the
worker's peak, which a long-lived actor reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit for this setting on 64-bit
TRIM_THRESHOLD = 1024 * 1024 * 1024

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; False where there is no glibc."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # musl and other libcs have no mallopt: keep their defaults
        return False
    _done = ok
    return ok
