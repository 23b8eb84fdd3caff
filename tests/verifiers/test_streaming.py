"""Streaming verification: the sampler hands rows to the verifier pool as they stop; the scores equal those of
verifying the finished rollout in one batch (`verify`); `enough` waits for scores only until they settle its answer,
and after an early stop `finish` waits for no later row."""

import json
import time

import numpy as np
import pytest

from prime_jax.data.example import Example
from prime_jax.rl.collect import CollectConfig, Prompt, accepted_groups
from prime_jax.verifiers.pool import VerifierPool
from prime_jax.verifiers.streaming import StreamingVerifier, verify
from tests.fixtures import answer_text, toy_sampler

N = 2


@pytest.fixture(scope="module")
def setup(qwen2_dir):
    prompts, sample, calls = toy_sampler(qwen2_dir, N)
    with VerifierPool(2, item_timeout_s=30.0, batch_timeout_s=120.0) as pool:
        yield prompts, sample, calls, pool


def test_rows_stream_to_the_verifiers_while_decoding_and_score_as_one_batch(setup):
    prompts, sample, calls, pool = setup
    calls.clear()
    verifier = StreamingVerifier(prompts, N, answer_text, pool)
    rollout = sample(prompts, 3, verifier)
    assert len(calls) > 2 and sum(calls) == len(prompts) * N  # handed over in several parts, every row once
    assert len(verifier.stream.items) == len(prompts) * N  # all queued before the wait for scores
    acc, counts, span = verifier.finish()
    ref, ref_counts = verify(rollout, prompts, N, answer_text, pool)
    np.testing.assert_array_equal(acc, ref)
    assert counts == ref_counts and counts["unknown_ability"] == 2 * N  # prompts 0 and 4 are "poetry"
    assert 0 < acc.mean() < 1 and span >= 0 and verifier.exposed_s > 0
    # The part of the verifiers' host time the sampler saw hidden behind decoding is a part of it.
    assert 0 <= rollout.callbacks_hidden_s <= verifier.exposed_s


SLOW_CODE = "```python\nimport time\ndef f():\n    time.sleep(3)\n    return True\n```"


def test_enough_waits_only_until_the_scores_settle_its_answer(setup):
    """Group 0 (math, one row right: accepted) scores at once, group 1 (code whose rows sleep 3 s) later.
    `enough(1)` answers True without waiting for group 1; `enough(2)` waits for it (both rows pass: rejected, all
    right) and answers False; every answer is the one all the scores give."""
    pool = setup[3]
    prompts = [Prompt(Example([], "math", "1", "test", "m"), (5,)),
               Prompt(Example([], "code", json.dumps({"prelude": "", "asserts": ["assert f()"]}), "test", "c"), (6,))]
    texts = {0: "\\boxed{1}", 1: "\\boxed{0}", 2: SLOW_CODE}
    verifier = StreamingVerifier(prompts, N, lambda ids: texts[int(ids[0])], pool)
    tokens = np.array([[0, 9], [1, 9], [2, 9], [2, 9]])
    cfg = CollectConfig(batch_size=2, n=N)
    accept = lambda acc, lengths, limit: accepted_groups(acc, lengths, N, cfg, limit)  # noqa: E731
    verifier(np.arange(4), tokens, np.full(4, 2))
    assert not verifier.enough(accept, 1)  # decides on the groups complete one call (a decode round) before: none
    start = time.perf_counter()
    first = verifier.enough(accept, 1)
    early = time.perf_counter() - start
    answers = [first] + [verifier.enough(accept, k) for k in (2, 3, 0)]
    late = time.perf_counter() - start
    acc, _, _ = verifier.finish()
    kept = int(accepted_groups(acc, np.full(4, 2), N, cfg, 2).sum())
    assert acc.tolist() == [1, 0, 1, 1] and kept == 1
    assert answers == [True, False, False, True] == [k <= kept for k in (1, 2, 3, 0)]
    assert early < 1.5 < late


def test_an_early_stop_keeps_the_decided_groups_and_waits_for_no_later_row(setup):
    """Group 0 (math, one row right: accepted) is handed over; the rows of groups 1 and 2 (code that sleeps 3 s)
    come a decode round later. `enough(1)` then decides on group 0 alone and says True; `finish` keeps group 0
    only, drops the code rows no worker has taken yet and waits for the two that are running (3 s, not 6 s)."""
    pool = setup[3]
    code = Example([], "code", json.dumps({"prelude": "", "asserts": ["assert f()"]}), "test", "c")
    prompts = [Prompt(Example([], "math", "1", "test", "m"), (5,)), Prompt(code, (6,)), Prompt(code, (7,))]
    texts = {0: "\\boxed{1}", 1: "\\boxed{0}", 2: SLOW_CODE}
    verifier = StreamingVerifier(prompts, N, lambda ids: texts[int(ids[0])], pool)
    cfg = CollectConfig(batch_size=1, n=N)
    accept = lambda acc, lengths, limit: accepted_groups(acc, lengths, N, cfg, limit)  # noqa: E731
    verifier(np.arange(2), np.array([[0, 9], [1, 9]]), np.full(2, 2))
    assert not verifier.enough(accept, 1)
    verifier(np.arange(2, 6), np.full((4, 2), 2), np.full(4, 2))
    start = time.perf_counter()
    assert verifier.enough(accept, 1)
    acc, _, _ = verifier.finish()
    assert time.perf_counter() - start < 4.5
    assert verifier.sampled.tolist() == [True, False, False] and acc[:2].tolist() == [1, 0]
