"""Rollouts ahead of training: a thread collects step j's experience while the trainer trains the steps before it.

Policy version v is the policy after v updates (the trainer's step count). Step j's rollouts are sampled with

    version_for(j) = max(j - max_staleness, the last sync step <= j)

where the sync steps are the run's (or the resumed run's) first step and every multiple of `sync_every`
(checkpoint.freq and eval.freq). So the staleness j - version never exceeds `max_staleness`; a step whose
rollouts may use the policy of step j - k starts collecting as soon as update j - k is published; and at a sync
step the collection waits for the current policy. At a sync step nothing is in flight: validation has the
verifier pool to itself, and the data stream and prompt buffer a checkpoint stores are those before the step's
collection, so a run resumed from it (kill -9 included) takes exactly the steps of one that never stopped. The
price is one synchronous step per sync step. A checkpoint written between sync steps (a signal, the non-finite
guard) stores the state before the collection in flight (`state_before`); resumed, that step is collected again
with the current policy.

Every row of a collection is sampled by one version (`Experience.version`), so every RLOO group and every group
the filter keeps is one version; the PPO ratio is taken against the sampler's own log-probs (the behaviour
policy's), whatever its version.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from prime_jax.rl.collect import Experience

# (step, version, params of that version) -> (experience, metrics); runs in the rollout thread.
CollectStep = Callable[[int, int, Any], tuple[Experience, dict[str, float]]]


def version_for(step: int, max_staleness: int, start: int, sync_every: Iterable[int]) -> int:
    """The policy version step `step` samples with (see the module doc)."""
    last_sync = max([start] + [step - step % f for f in sync_every if step - step % f >= start])
    return max(step - max_staleness, last_sync)


def check_versions(exp: Experience, step: int, max_staleness: int) -> int:
    """Raises RuntimeError unless every group of `exp` is one policy version within `max_staleness` of `step`;
    returns the batch's staleness (step - oldest version)."""
    versions = exp.version.reshape(-1, exp.n)
    mixed = np.flatnonzero((versions != versions[:, :1]).any(axis=1))
    if mixed.size:
        raise RuntimeError(f"step {step}: group {mixed[0]} mixes policy versions {sorted(set(versions[mixed[0]]))}: "
                           "its RLOO baseline would compare responses of different policies")
    staleness = step - int(exp.version.min())
    if not 0 <= staleness <= max_staleness or int(exp.version.max()) > step:
        raise RuntimeError(f"step {step}: rollouts of policy versions {exp.version.min()}..{exp.version.max()} exceed "
                           f"rollout.max_staleness={max_staleness}")
    return staleness


class RolloutsAhead:
    """The rollout thread of one `fit`: `publish(version, params)` after each update (and once for the first step's
    policy), `take(step)` the step's experience and metrics (blocking). `state_before(step, current)` is the data
    state a checkpoint at `step` stores: the one saved before that step's collection if it has started, else
    `current()` (read while the thread cannot start it). Any error in the thread is raised by `take`."""

    def __init__(self, collect_step: CollectStep, snapshot: Callable[[], Any], *, start: int, total_steps: int,
                 max_staleness: int, sync_every: tuple[int, ...]):
        self._collect, self._snapshot = collect_step, snapshot
        self.start, self.total_steps, self.max_staleness, self.sync_every = start, total_steps, max_staleness, sync_every
        self._cond = threading.Condition()
        self._params: dict[int, Any] = {}          # published versions still needed
        self._ready: dict[int, tuple[Experience, dict[str, float]]] = {}
        self._before: dict[int, Any] = {}          # step -> data state before its collection
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="rollouts-ahead", daemon=True)
        self._thread_started = False

    def version_for(self, step: int) -> int:
        return version_for(step, self.max_staleness, self.start, self.sync_every)

    def publish(self, version: int, params: Any) -> None:
        """Policy `version` (its params, already on the sampler's mesh and not donated by training)."""
        with self._cond:
            self._params[version] = params
            self._cond.notify_all()
        if not self._thread_started:  # the first version: the thread starts with it (it may finish before the run)
            self._thread_started = True
            self._thread.start()

    def take(self, step: int) -> tuple[Experience, dict[str, float]]:
        with self._cond:
            self._cond.wait_for(lambda: step in self._ready or self._error is not None)
            if self._error is not None:
                raise RuntimeError(f"the rollout thread failed while collecting ahead of step {step}") from self._error
            self._before.pop(step - 1, None)
            return self._ready.pop(step)

    def state_before(self, step: int, current: Callable[[], Any]) -> Any:
        with self._cond:
            return self._before[step] if step in self._before else current()

    def close(self) -> None:
        """Stops the thread after the collection in flight (its experience is dropped)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread_started:
            self._thread.join()

    def _run(self) -> None:
        try:
            for step in range(self.start, self.total_steps):
                version = self.version_for(step)
                with self._cond:
                    self._cond.wait_for(lambda: version in self._params or self._closed)
                    if self._closed:
                        return
                    params = self._params[version]
                    # Versions older than this one are never sampled again (version_for grows with the step).
                    for old in [v for v in self._params if v < version]:
                        del self._params[old]
                    self._before[step] = self._snapshot()
                exp, metrics = self._collect(step, version, params)
                with self._cond:
                    self._ready[step] = (exp, metrics)
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the trainer by take()
            with self._cond:
                self._error = e
                self._cond.notify_all()
