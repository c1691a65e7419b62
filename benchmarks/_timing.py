"""The one timing rule of the benchmarks: the median wall time of `fn` over `repeats` calls after `warmup` calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Seconds per call of `fn`: the median over `repeats` timed calls, after `warmup` untimed ones (kernels,
    caches, merged weights). `fn` synchronises the device itself where that matters."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
