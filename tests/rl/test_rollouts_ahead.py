"""Rollouts ahead of training: the version each step samples with, the one-version-per-group invariant, and the
rollout thread driven as the trainer drives it (publish after each update, take each step)."""

import threading

import numpy as np
import pytest

from prime_jax.rl.collect import Experience
from prime_jax.rl.rollouts_ahead import RolloutsAhead, check_versions, version_for


def test_version_for_by_hand():
    # k=1 from step 0, sync every 10 steps: step j samples with j-1, but j=0 and j=10 wait for the current policy.
    assert [version_for(j, 1, 0, (10,)) for j in range(13)] == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 11]
    # k=2 resumed at step 5, syncs every 10 and 4 steps (checkpoint, eval): 4 is before the start and does not count.
    assert [version_for(j, 2, 5, (10, 4)) for j in range(5, 14)] == [5, 5, 5, 8, 8, 10, 10, 12, 12]
    # k=0 is the synchronous loop.
    assert [version_for(j, 0, 0, (3,)) for j in range(6)] == list(range(6))


@pytest.mark.parametrize("k,start,sync", [(1, 0, (5,)), (2, 3, (4, 10)), (3, 0, (100,)), (5, 7, (6,))])
def test_staleness_is_bounded_and_versions_never_go_back(k, start, sync):
    versions = [version_for(j, k, start, sync) for j in range(start, start + 60)]
    staleness = [j - v for j, v in zip(range(start, start + 60), versions)]
    assert min(staleness) == 0 and max(staleness) == k
    assert all(b >= a for a, b in zip(versions, versions[1:]))


def experience(versions, n):
    rows = len(versions)
    zeros = np.zeros((rows, 2))
    return Experience([None] * (rows // n), zeros, zeros, zeros, zeros, zeros, np.zeros(rows), np.ones(rows, bool),
                      np.asarray(versions, np.int64), n)


def test_a_group_that_mixes_policy_versions_is_refused():
    assert check_versions(experience([4, 4, 3, 3], n=2), step=5, max_staleness=2) == 2
    with pytest.raises(RuntimeError, match="group 1 mixes policy versions"):
        check_versions(experience([4, 4, 4, 3], n=2), step=5, max_staleness=2)


def test_rollouts_beyond_the_staleness_bound_or_from_the_future_are_refused():
    with pytest.raises(RuntimeError, match="exceed rollout.max_staleness=1"):
        check_versions(experience([3, 3], n=2), step=5, max_staleness=1)
    with pytest.raises(RuntimeError, match="exceed"):
        check_versions(experience([6, 6], n=2), step=5, max_staleness=1)


def drive(ahead: RolloutsAhead, start: int, total: int, updates: list) -> list:
    """The trainer's side: publish the first policy, then take each step and publish its update."""
    taken = []
    ahead.publish(start, f"params{start}")
    for step in range(start, total):
        exp, metrics = ahead.take(step)
        taken.append((step, metrics["version"], int(exp.version[0])))
        updates.append(step + 1)
        if step + 1 < total:
            ahead.publish(step + 1, f"params{step + 1}")
    ahead.close()
    return taken


def test_the_thread_samples_each_step_with_its_version_and_keeps_the_state_before_it():
    seen, data = [], {"position": 0}

    def collect_step(step, version, params):
        assert params == f"params{version}"  # the params published as that version, not a newer one
        seen.append((step, version, threading.current_thread().name))
        data["position"] += 1
        return experience([version] * 4, n=2), {"version": version}

    ahead = RolloutsAhead(collect_step, lambda: dict(data), start=2, total_steps=9, max_staleness=2, sync_every=(5,))
    taken = drive(ahead, 2, 9, [])
    expected = [(j, version_for(j, 2, 2, (5,))) for j in range(2, 9)]
    assert [(s, v) for s, v, _ in seen] == expected and {t for _, _, t in seen} == {"rollouts-ahead"}
    assert [(s, v) for s, v, _ in taken] == expected and all(v == w for _, v, w in taken)
    # The data state before step 8's collection (7 collections from step 2 on: 6 done before it started).
    assert ahead.state_before(8, lambda: "current") == {"position": 6}
    assert ahead.state_before(9, lambda: "current") == "current"  # never started: the caller's current state


def test_the_trainer_may_publish_after_the_thread_collected_the_last_step():
    """k=2: the last step's rollouts need an old version, so the thread can finish while the trainer still trains and
    publishes its updates."""
    done = threading.Event()

    def collect_step(step, version, params):
        if step == 4:
            done.set()
        return experience([version] * 2, n=2), {"version": version}

    ahead = RolloutsAhead(collect_step, dict, start=0, total_steps=5, max_staleness=2, sync_every=(100,))
    ahead.publish(0, "params0")
    for step in range(5):
        ahead.take(step)
        if step == 2:
            assert done.wait(10) and ahead._thread.join(10) is None and not ahead._thread.is_alive()
        ahead.publish(step + 1, f"params{step + 1}")  # after the thread is gone: no error
    ahead.close()


def test_an_error_in_the_rollout_thread_is_raised_by_take():
    def collect_step(step, version, params):
        raise ValueError("verifier pool died")

    ahead = RolloutsAhead(collect_step, dict, start=0, total_steps=3, max_staleness=1, sync_every=(10,))
    ahead.publish(0, "params0")
    with pytest.raises(RuntimeError, match="collecting ahead of step 0") as info:
        ahead.take(0)
    assert isinstance(info.value.__cause__, ValueError)
    ahead.close()
