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


def bench_model_config():
    """The model the throughput benches share: Qwen2 architecture, d=256, 4 layers, 8/2 heads, vocab 4096."""
    from tests.fixtures import tiny_config

    return tiny_config(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                       num_kv_heads=2, head_dim=32, logits_chunk=1024)
