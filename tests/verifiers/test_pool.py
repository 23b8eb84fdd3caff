"""Verifier pool: mixed batches with correct, wrong, hanging and crashing items, batch deadline,
worker recycling, a stream of items scored while more are added, and argument checks."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from prime_jax.verifiers.pool import COUNT_KEYS, VerifierPool, VerifyItem
from prime_jax.verifiers.sandbox import Limits


def code_item(program: str, asserts: list[str]) -> VerifyItem:
    return VerifyItem(f"```python\n{program}\n```", "code", json.dumps({"asserts": asserts}))


CORRECT_MATH = VerifyItem("Adding up, the total is \\boxed{\\frac{7}{2}}.", "math", "3.5")
WRONG_MATH = VerifyItem("Adding up, the total is \\boxed{\\frac{7}{3}}.", "math", "3.5")
CORRECT_CODE = code_item("def f(x):\n    return 2 * x", ["assert f(2) == 4", "assert f(0) == 0"])
WRONG_CODE = code_item("def f(x):\n    return x + 2", ["assert f(2) == 4", "assert f(0) == 0"])  # 1 of 2
HANGING_CODE = code_item("def f(x):\n    while True:\n        pass", ["assert f(1)"])
SLOW_CODE = code_item("import time\ndef f():\n    time.sleep(20)\n    return True", ["assert f()"])
STDIO_CODE = VerifyItem(
    "```python\nprint(sum(map(int, input().split())))\n```", "code", '{"inputs": ["2 3"], "outputs": ["5"]}'
)


def _kill_worker_scoring(pool: VerifierPool, index: int, stop: threading.Event) -> None:
    """Stand-in for the OOM killer: SIGKILL the worker process while it scores item `index`."""
    while not stop.is_set():
        for worker in list(pool._workers):
            running = list(worker.pending)[:1]  # head of the worker's chunk = the item it is scoring
            if running == [index] and time.monotonic() - worker.started > 0.5:
                os.kill(worker.process.pid, signal.SIGKILL)
                return
        time.sleep(0.02)


def test_mixed_batch_scores_and_counts_in_bounded_time() -> None:
    items = [
        SLOW_CODE,  # its worker is killed mid-item -> crash
        CORRECT_MATH,
        WRONG_MATH,
        CORRECT_CODE,
        WRONG_CODE,
        HANGING_CODE,  # outlives the item deadline -> timeout
        VerifyItem("a sonnet", "poetry", "14 lines"),  # unknown ability
        VerifyItem("print(1)", "code", '{"inputs": ["1"]}'),  # malformed ground truth -> error
        CORRECT_MATH,
        STDIO_CODE,
    ]
    expected = np.array([0, 1, 0, 1, 0.5, 0, 0, 0, 1, 1], np.float32)
    with VerifierPool(2, item_timeout_s=6.0, batch_timeout_s=120.0, code_limits=Limits(timeout_s=30.0)) as pool:
        stop = threading.Event()
        killer = threading.Thread(target=_kill_worker_scoring, args=(pool, 0, stop))
        killer.start()
        start = time.monotonic()
        try:
            result = pool.score_batch(items)
        finally:
            stop.set()
            killer.join()
        elapsed = time.monotonic() - start
        assert result.scores.dtype == np.float32 and result.scores.shape == (len(items),)
        np.testing.assert_array_equal(result.scores, expected)
        assert result.counts == {"timeouts": 1, "batch_timeouts": 0, "errors": 1, "crashes": 1, "unknown_ability": 1,
                                 "unsandboxed": 0}
        assert elapsed < 40
        # the replaced workers carry on
        again = pool.score_batch([CORRECT_CODE, WRONG_MATH, CORRECT_MATH])
        np.testing.assert_array_equal(again.scores, [1, 0, 1])
        assert sum(again.counts.values()) == 0


def test_batch_deadline() -> None:
    items = [CORRECT_MATH, CORRECT_MATH, HANGING_CODE, HANGING_CODE, HANGING_CODE]
    with VerifierPool(2, item_timeout_s=60.0, batch_timeout_s=4.0, code_limits=Limits(timeout_s=30.0)) as pool:
        start = time.monotonic()
        result = pool.score_batch(items)
        elapsed = time.monotonic() - start
        np.testing.assert_array_equal(result.scores, [1, 1, 0, 0, 0])
        assert result.counts["batch_timeouts"] == 3  # two killed in flight, one never started
        assert 4.0 <= elapsed < 10.0
        np.testing.assert_array_equal(pool.score_batch([CORRECT_MATH]).scores, [1])


def test_stream_scores_items_while_more_are_added() -> None:
    """Items added to a stream are scored while the caller does other work (poll never waits); later items
    join the same stream; an item overrunning its deadline is failed while polling; finish waits for the rest."""
    with VerifierPool(2, item_timeout_s=3.0, batch_timeout_s=60.0, code_limits=Limits(timeout_s=30.0)) as pool:
        stream = pool.stream()
        assert list(stream.add([CORRECT_MATH, WRONG_MATH])) == [0, 1]
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:  # e.g. the sampler decoding meanwhile
            time.sleep(0.05)
            seen += stream.poll()
        assert sorted(seen) == [0, 1]
        assert list(stream.add([HANGING_CODE, CORRECT_CODE, VerifyItem("a sonnet", "poetry", "14 lines")])) == [2, 3, 4]
        with pytest.raises(RuntimeError, match="another stream"):
            pool.stream()
        start = time.monotonic()
        while time.monotonic() - start < 5:
            seen += stream.poll()
            time.sleep(0.05)
        assert 2 in seen  # the hanging item failed on its deadline during polling, before finish
        result = stream.finish()
        np.testing.assert_array_equal(result.scores, [1, 0, 0, 1, 0])
        assert result.counts == {"timeouts": 1, "batch_timeouts": 0, "errors": 0, "crashes": 0, "unknown_ability": 1,
                             "unsandboxed": 0}
        assert sorted(seen + stream.poll()) == [0, 1, 2, 3, 4]
        np.testing.assert_array_equal(pool.score_batch([CORRECT_MATH]).scores, [1])


def test_workers_are_recycled() -> None:
    with VerifierPool(2, item_timeout_s=60.0, batch_timeout_s=120.0, max_tasks_per_worker=2) as pool:
        before = {w.process.pid for w in pool._workers}
        result = pool.score_batch([CORRECT_MATH, WRONG_MATH] * 4)
        after = {w.process.pid for w in pool._workers}
        np.testing.assert_array_equal(result.scores, [1, 0] * 4)
        assert sum(result.counts.values()) == 0
        assert before.isdisjoint(after)


def test_empty_batch_and_closed_pool() -> None:
    pool = VerifierPool(1, item_timeout_s=10.0, batch_timeout_s=10.0)
    result = pool.score_batch([])
    assert result.scores.shape == (0,) and result.counts == dict.fromkeys(COUNT_KEYS, 0)
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.score_batch([CORRECT_MATH])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_workers": 0, "item_timeout_s": 1.0, "batch_timeout_s": 1.0}, "num_workers"),
        ({"num_workers": 1, "item_timeout_s": 0.0, "batch_timeout_s": 1.0}, "timeouts"),
        ({"num_workers": 1, "item_timeout_s": 1.0, "batch_timeout_s": 1.0, "max_tasks_per_worker": 0}, "max_tasks"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VerifierPool(**kwargs)
