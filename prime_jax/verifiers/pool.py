"""Host process pool that scores a batch of responses with the math and code verifiers.

Workers come from a `forkserver` that has the verifier modules imported, so starting or
replacing one is a cheap fork of a process that never loaded JAX. Each worker scores one item
at a time in its main thread (math-verify's SIGALRM timeouts need that). The parent enforces a
per-item and a per-batch deadline: a worker that overruns is killed (its sandboxes die with it)
and replaced; a worker that dies is replaced; a worker is retired after `max_tasks_per_worker`
items to bound memory growth. Whatever goes wrong with an item scores it 0.0 and is counted;
`score_batch` never raises because of an item. `stream()` scores items while more are added (the
trainer hands rows over as the sampler stops them, while it decodes).

Code runs only in a bubblewrap sandbox unless `allow_unsandboxed`: without one, the pool logs one
error line at start-up saying how to install it, and every code item scores 0, counted as
`unsandboxed`.

As with any spawn/forkserver pool, each worker imports the program's `__main__` module, which
must therefore guard its entry point with `if __name__ == "__main__":` and stay cheap to import.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from prime_jax.verifiers.sandbox import BWRAP_INSTALL, Limits, SandboxUnavailable, sandbox_problem

log = logging.getLogger(__name__)
ABILITIES = ("math", "code")
COUNT_KEYS = ("timeouts", "batch_timeouts", "errors", "crashes", "unknown_ability", "unsandboxed")
_PRELOAD = ["prime_jax.verifiers.math", "prime_jax.verifiers.code"]
_WORKER_START_TIMEOUT_S = 120.0
_MAX_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class VerifyItem:
    """One response to verify. ability: "math" | "code"; ground_truth: LaTeX answer or code tests JSON."""

    response: str
    ability: str
    ground_truth: str


@dataclasses.dataclass
class BatchResult:
    """scores: [N] float32 in [0, 1], aligned with the items; counts: failures by kind (COUNT_KEYS)."""

    scores: np.ndarray
    counts: dict[str, int]


def _score_item(ability: str, response: str, ground_truth: str, code_limits: Limits, literal_numbers: bool,
                code_mode: str) -> float:
    # Imported here, not at module level: the trainer process that owns the pool never needs
    # sympy; the workers get these modules preloaded by the forkserver.
    from prime_jax.verifiers import code as code_verifier
    from prime_jax.verifiers import math as math_verifier

    if ability == "math":
        return math_verifier.score(response, ground_truth, literal_numbers=literal_numbers)
    if code_mode == "refuse":
        raise SandboxUnavailable("no working bubblewrap")
    return code_verifier.score(response, ground_truth, code_limits, allow_unsandboxed=code_mode == "unsandboxed")


def _worker_main(conn: multiprocessing.connection.Connection, memory_bytes: int | None, code_limits: Limits,
                 literal_numbers: bool, code_mode: str) -> None:
    """Worker: set up, say "ready", then for each chunk of (index, ability, response, ground_truth)
    received, send (index, score, failure count key or None) per item as it finishes; stop on None or EOF."""
    # A session of its own: Ctrl-C aimed at the trainer does not kill a worker mid-item (close()
    # stops workers), and with Linux autogroup scheduling the workers are not squeezed into the
    # CPU share of the trainer's session.
    os.setsid()
    if memory_bytes is not None:  # a runaway sympy computation fails with MemoryError instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    conn.send("ready")
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for index, ability, response, ground_truth in chunk:
            try:
                value = _score_item(ability, response, ground_truth, code_limits, literal_numbers, code_mode)
                result = (index, float(value), None)
            except SandboxUnavailable:  # not run (fails closed): scores 0, counted by the parent
                result = (index, 0.0, "unsandboxed")
            except Exception:  # a verifier failure scores 0 (counted by the parent)
                result = (index, 0.0, "errors")
            conn.send(result)


def _code_mode(allow_unsandboxed: bool) -> str:
    """How workers treat code items: "bwrap" (sandboxed), "unsandboxed" (opted in) or "refuse".
    Decided once, here, with the one start-up log line when there is no working bubblewrap."""
    problem = sandbox_problem()
    if problem is None:
        return "bwrap"
    if allow_unsandboxed:
        log.warning("code verifier: %s; verifier.allow_unsandboxed=True, so model-written code runs with rlimits "
                    "only (and its own uid when root): UNSAFE", problem)
        return "unsandboxed"
    log.error("code verifier: %s, so code items score 0 (counted as verifier/unsandboxed); install it with "
              "`%s`, or set verifier.allow_unsandboxed=True to run model-written code without a sandbox (unsafe)",
              problem, BWRAP_INSTALL)
    return "refuse"


@dataclasses.dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    tasks: int = 0  # items finished
    pending: deque = dataclasses.field(default_factory=deque)  # indices sent, in order; head is running
    started: float = 0.0  # when the head item started (as seen by the parent)


class VerifierPool:
    """Scores batches of VerifyItems in `num_workers` processes.

    item_timeout_s: wall-clock limit per item (then the worker is killed and the item scores 0).
    batch_timeout_s: wall-clock limit per `score_batch` call; unfinished items score 0.
    max_tasks_per_worker: items after which a worker is replaced by a fresh one.
    worker_memory_bytes: address-space limit of each worker (None: unlimited); sandboxed code
      gets its own, lower limit.
    code_limits: sandbox limits for code items (per-test timeout, memory, ...).
    allow_unsandboxed: run code without a working bubblewrap (rlimits, and a uid of its own when
      root, only): unsafe. Otherwise code items then score 0, counted as `unsandboxed`.

    Items go to idle workers in small chunks (at most `_MAX_CHUNK`, fewer as the queue drains)
    and come back one result at a time, so a worker does not wait for the parent between items
    while every item still has its own deadline.
    """

    def __init__(
        self,
        num_workers: int,
        item_timeout_s: float,
        batch_timeout_s: float,
        max_tasks_per_worker: int = 1000,
        worker_memory_bytes: int | None = 8 << 30,
        code_limits: Limits = Limits(),
        literal_numbers: bool = False,
        allow_unsandboxed: bool = False,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if item_timeout_s <= 0 or batch_timeout_s <= 0:
            raise ValueError(f"timeouts must be > 0, got item {item_timeout_s}, batch {batch_timeout_s}")
        if max_tasks_per_worker < 1:
            raise ValueError(f"max_tasks_per_worker must be >= 1, got {max_tasks_per_worker}")
        self.item_timeout_s = item_timeout_s
        self.batch_timeout_s = batch_timeout_s
        self.max_tasks_per_worker = max_tasks_per_worker
        self.worker_memory_bytes = worker_memory_bytes
        self.code_limits = code_limits
        self.literal_numbers = literal_numbers
        self.code_mode = _code_mode(allow_unsandboxed)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)
        self._workers = [self._start_worker() for _ in range(num_workers)]

    def _start_worker(self) -> _Worker:
        """A new worker, returned once it is ready; RuntimeError if it cannot start."""
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main,
            args=(child, self.worker_memory_bytes, self.code_limits, self.literal_numbers, self.code_mode),
            daemon=True
        )
        process.start()
        child.close()
        try:
            ready = parent.poll(_WORKER_START_TIMEOUT_S) and parent.recv() == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            process.kill()
            process.join()
            parent.close()
            raise RuntimeError(f"a verifier worker failed to start within {_WORKER_START_TIMEOUT_S} s")
        return _Worker(process, parent)

    def _replace(self, worker: _Worker, kill: bool) -> None:
        """Stop `worker` (SIGKILL, or a polite None) and put a fresh one in its place."""
        if kill:
            worker.process.kill()
        else:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        worker.process.join(timeout=None if kill else 5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
        self._workers[self._workers.index(worker)] = self._start_worker()

    def _dispatch(self, queue: deque, items: Sequence[VerifyItem]) -> None:
        """Send a chunk of queued items to every idle worker."""
        for worker in list(self._workers):
            if worker.pending or not queue:
                continue
            if not worker.process.is_alive():  # died between batches: replace, nothing lost
                worker.conn.close()
                self._workers[self._workers.index(worker)] = worker = self._start_worker()
            size = min(_MAX_CHUNK, self.max_tasks_per_worker - worker.tasks, -(-len(queue) // (2 * len(self._workers))))
            chunk = [queue.popleft() for _ in range(max(1, min(size, len(queue))))]
            worker.pending.extend(chunk)
            worker.started = time.monotonic()
            try:
                worker.conn.send([(i, items[i].ability, items[i].response, items[i].ground_truth) for i in chunk])
            except OSError:  # died just now: the wait in score_batch sees it
                pass

    def _fail_head(self, worker: _Worker, s: ScoreStream, kind: str) -> None:
        """The worker's running item fails as `kind` (scores 0); the rest of its chunk is queued again (but for
        cancelled items); the worker is replaced."""
        s.counts[kind] += 1
        s.finished.append(worker.pending.popleft())
        s.queue.extendleft(reversed([i for i in worker.pending if i not in s.cancelled]))
        worker.pending.clear()
        self._replace(worker, kill=True)

    def stream(self) -> ScoreStream:
        """A stream of items scored while more are added (e.g. rows handed over as the sampler stops them)."""
        if not self._workers:
            raise RuntimeError("VerifierPool is closed")
        if any(w.pending for w in self._workers):
            raise RuntimeError("VerifierPool: another stream is still being scored")
        return ScoreStream(self)

    def score_batch(self, items: Sequence[VerifyItem]) -> BatchResult:
        """Scores for `items` ([N] float32) plus failure counts.

        Never raises because of an item; raises RuntimeError only if the pool is closed or a
        replacement worker cannot be started at all.
        """
        stream = self.stream()
        stream.add(items)
        return stream.finish()

    def _step(self, s: ScoreStream, deadline: float | None) -> None:
        """Dispatches queued items to idle workers, takes the results that arrive until one does or the earliest
        item deadline or `deadline` (None: wait for one; `now`: do not wait) passes, and fails overdue items."""
        self._dispatch(s.queue, s.items)
        busy = [w for w in self._workers if w.pending]
        if not busy:
            return
        wake = min([w.started + self.item_timeout_s for w in busy] + ([] if deadline is None else [deadline]))
        ready = multiprocessing.connection.wait(
            [w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=max(0.0, wake - time.monotonic())
        )
        for worker in busy:
            if worker.conn in ready:
                try:
                    while worker.pending and worker.conn.poll():
                        index, value, failure = worker.conn.recv()
                        if index != worker.pending[0]:
                            raise RuntimeError(f"worker answered item {index}, expected {worker.pending[0]}")
                        worker.pending.popleft()
                        worker.started = time.monotonic()
                        worker.tasks += 1
                        s.scores[index] = value
                        if failure is not None:
                            s.counts[failure] += 1
                        s.finished.append(index)
                except (EOFError, OSError, RuntimeError):
                    self._fail_head(worker, s, "crashes")
                    continue
                if not worker.pending and worker.tasks >= self.max_tasks_per_worker:
                    self._replace(worker, kill=False)
            elif worker.process.sentinel in ready:
                self._fail_head(worker, s, "crashes")
        now = time.monotonic()
        if s.deadline is not None and now >= s.deadline:
            for worker in [w for w in self._workers if w.pending]:
                s.counts["batch_timeouts"] += len(worker.pending)
                s.finished.extend(worker.pending)
                worker.pending.clear()
                self._replace(worker, kill=True)
            s.counts["batch_timeouts"] += len(s.queue)
            s.finished.extend(s.queue)
            s.queue.clear()
        for worker in [w for w in self._workers if w.pending and now >= w.started + self.item_timeout_s]:
            self._fail_head(worker, s, "timeouts")

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        workers, self._workers = self._workers, []
        for worker in workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ScoreStream:
    """Items of one batch scored while more are added: `add` queues items and hands them to idle workers
    at once, `poll` takes the scores that came back without waiting, `wait` waits for some, `finish` for the rest.
    The per-batch deadline (`batch_timeout_s`) runs from `finish`; per-item deadlines are enforced
    whenever the stream is polled or finished. One stream per pool at a time."""

    def __init__(self, pool: VerifierPool) -> None:
        self.pool = pool
        self.items: list[VerifyItem] = []
        self.scores: list[float] = []
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.queue: deque = deque()
        self.finished: list[int] = []  # indices finished (scored or failed) and not yet returned by poll
        self.cancelled: set[int] = set()  # indices never to be (re)dispatched
        self.deadline: float | None = None

    def add(self, items: Sequence[VerifyItem]) -> range:
        """Queues `items` and dispatches what idle workers can take; returns their indices in the stream."""
        first = len(self.items)
        self.items.extend(items)
        self.scores.extend([0.0] * len(items))
        for index, item in enumerate(items, first):
            if item.ability in ABILITIES:
                self.queue.append(index)
            else:
                self.counts["unknown_ability"] += 1
                self.finished.append(index)
        self.pool._step(self, time.monotonic())
        return range(first, len(self.items))

    def poll(self) -> list[int]:
        """Indices whose score is final since the last poll (scored, or failed and scored 0); never waits."""
        self.pool._step(self, time.monotonic())
        out, self.finished = self.finished, []
        return out

    def wait(self, indices: Sequence[int], count: int) -> list[int]:
        """Waits until at least `count` of the items `indices` are final since the last poll, or all of them are
        (item deadlines apply) -> every index final since the last poll, as `poll`."""
        wanted = set(indices)
        count = min(count, len(wanted))
        got = len(wanted.intersection(self.finished))
        while got < count and (self.queue or any(w.pending for w in self.pool._workers)):
            seen = len(self.finished)
            self.pool._step(self, None)
            got += len(wanted.intersection(self.finished[seen:]))
        return self.poll()

    def cancel(self, indices: Sequence[int]) -> None:
        """Drops the items among `indices` that no worker has taken yet (a worker finishes the chunk it holds):
        they score 0, counted nowhere."""
        self.cancelled.update(indices)
        self.queue = deque(i for i in self.queue if i not in self.cancelled)

    def finish(self) -> BatchResult:
        """Waits for every item (at most `batch_timeout_s` from now) -> scores [N] float32 and failure counts."""
        self.deadline = time.monotonic() + self.pool.batch_timeout_s
        while self.queue or any(w.pending for w in self.pool._workers):
            self.pool._step(self, self.deadline)
        return BatchResult(np.asarray(self.scores, np.float32), self.counts)
