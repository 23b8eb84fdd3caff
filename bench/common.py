"""Shared by the bench scripts: timing that excludes compilation."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import numpy as np


def first_and_median(fn: Callable[[], object], repeats: int,
                     warmup: Callable[[], object] | None = None) -> tuple[float, float]:
    """(wall seconds of one warm-up call (`warmup`, default `fn`: compiles, fills caches), median wall seconds
    of the next `repeats` calls of `fn`)."""
    t0 = time.perf_counter()
    (warmup or fn)()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def median_seconds(fn: Callable[[], object], repeats: int, warmup: Callable[[], object] | None = None) -> float:
    """Median wall seconds of `repeats` calls of `fn`, after one untimed warm-up call (see `first_and_median`)."""
    return first_and_median(fn, repeats, warmup)[1]


def interleaved_rates(fns: dict[str, Callable[[], int]], repeats: int,
                      warmups: dict[str, Callable[[], object]] | None = None) -> dict[str, float]:
    """Median units per second of each `fns[k]()`, which returns the units it processed (e.g. tokens): one untimed
    warm-up of each (`warmups[k]`, default the fn), then `repeats` rounds that time every fn once in turn, so that a
    slow spell of a shared machine hits every variant alike and their ratios stay comparable."""
    for name, fn in fns.items():
        (warmups or {}).get(name, fn)()
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            units = fn()
            rates[name].append(units / (time.perf_counter() - t0))
    return {name: float(np.median(r)) for name, r in rates.items()}


def torch_device() -> str:
    """Where the PyTorch side of a bench runs: "cuda" when PyTorch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def attention_kernels(compiled_text: str) -> str:
    """Which attention kernel a compiled XLA program calls, read from its HLO text: cuDNN fused attention
    (custom calls `__cudnn$fmha...`), a TPU Pallas/Mosaic kernel (`tpu_custom_call`), or XLA's own ops."""
    cudnn = len(re.findall(r'custom_call_target="__cudnn\$fmha', compiled_text))
    mosaic = len(re.findall(r'custom_call_target="tpu_custom_call"', compiled_text))
    if cudnn:
        return f"cuDNN fused attention ({cudnn} custom calls)"
    if mosaic:
        return f"Pallas/Mosaic TPU kernel ({mosaic} custom calls)"
    return "XLA (no fused-attention custom call)"


def bench_model_config():
    """The model the throughput benches share: Qwen2 architecture, d=256, 4 layers, 8/2 heads, vocab 4096."""
    from tests.fixtures import tiny_config

    return tiny_config(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                       num_kv_heads=2, head_dim=32, logits_chunk=1024)
