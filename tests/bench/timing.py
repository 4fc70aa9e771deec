"""Best-of-runs wall time: noise on a shared machine only ever slows a run down."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_time(fn: Callable[[], object], min_runs: int = 3, budget_s: float = 1.0) -> float:
    """Best wall time in seconds after one warm-up; at least min_runs runs, more while under budget."""
    fn()
    times: list[float] = []
    while len(times) < min_runs or sum(times) < budget_s and len(times) < 20:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
