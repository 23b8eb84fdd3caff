"""Shared by the bench scripts: timing that excludes compilation."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def median_seconds(fn: Callable[[], object], repeats: int, warmup: Callable[[], object] | None = None) -> float:
    """Median wall seconds of `repeats` calls of `fn`, after one untimed warm-up call (`warmup`, default
    `fn`: compiles, fills caches)."""
    (warmup or fn)()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
