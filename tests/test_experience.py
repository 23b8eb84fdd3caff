"""Streaming verification: the sampler hands rows to the verifier pool as they stop; the scores equal those of
verifying the finished rollout in one batch, and `collect` logs the verification time decoding did not hide."""

import json
import time

import numpy as np
import pytest

from prime_jax.data.example import Example
from prime_jax.experience import CollectConfig, Prompt, StreamingVerifier, accepted_groups, collect, verify
from prime_jax.models import load_pretrained
from prime_jax.rewards.pool import VerifierPool
from prime_jax.sampling import generate

N = 2


def _text(ids: np.ndarray) -> str:
    """Response text whose answer depends on the sampled tokens: about a third of the rows are right."""
    return "\\boxed{%d}" % (int(ids[0]) % 3)


@pytest.fixture(scope="module")
def setup(qwen2_dir):
    model = load_pretrained(qwen2_dir)
    rng = np.random.default_rng(0)
    prompts = [Prompt(Example([], "math" if i % 4 else "poetry", "1", "test", str(i)),
                      tuple(rng.integers(1, 90, size=3 + i % 5).tolist())) for i in range(6)]
    calls = []

    def sample(ps, seed, on_rows=None, stop=None):
        def counted(rows, tokens, lengths):
            calls.append(len(rows))
            on_rows(rows, tokens, lengths)

        return generate(model, [list(p.ids) for p in ps], n=N, max_new_tokens=8, stop_ids=(3, 17, 50, 71, 88), seed=seed,
                        buckets=(8,), prompts_per_call=2, steps_per_sync=1, on_rows=counted if on_rows else None,
                        stop=stop)

    with VerifierPool(2, item_timeout_s=30.0, batch_timeout_s=120.0) as pool:
        yield prompts, sample, calls, pool


def test_rows_stream_to_the_verifiers_while_decoding_and_score_as_one_batch(setup):
    prompts, sample, calls, pool = setup
    calls.clear()
    verifier = StreamingVerifier(prompts, N, _text, pool)
    rollout = sample(prompts, 3, verifier)
    assert len(calls) > 2 and sum(calls) == len(prompts) * N  # handed over in several parts, every row once
    assert len(verifier.stream.items) == len(prompts) * N  # all queued before the wait for scores
    acc, counts, span = verifier.finish()
    ref, ref_counts = verify(rollout, prompts, N, _text, pool)
    np.testing.assert_array_equal(acc, ref)
    assert counts == ref_counts and counts["unknown_ability"] == 2 * N  # prompts 0 and 4 are "poetry"
    assert 0 < acc.mean() < 1 and span >= 0 and verifier.exposed_s > 0
    # The part of the verifiers' host time the sampler saw hidden behind decoding is a part of it.
    assert 0 <= rollout.callbacks_hidden_s <= verifier.exposed_s


def test_collect_keeps_the_scores_and_logs_exposed_verification(setup):
    prompts, sample, _, pool = setup
    stream = iter(prompts * 10)
    cfg = CollectConfig(batch_size=3, n=N, filter_accuracy=False, max_rounds=1)
    exp, buffer, metrics = collect(sample, lambda k: [next(stream) for _ in range(k)], [], _text, pool, cfg, seed=1)
    again = sample(prompts[:3], 1, None)  # the step's one sampler call, seed 1
    np.testing.assert_array_equal(exp.tokens, again.tokens)
    np.testing.assert_array_equal(exp.acc, verify(again, prompts[:3], N, _text, pool)[0])
    assert buffer == [] and metrics["train/groups_sampled"] == 3 and metrics["train/gen_tokens"] == again.lengths.sum()
    assert 0 <= metrics["timing/verify_exposed"] and 0 <= metrics["timing/verify"]


def test_collect_stops_sampling_once_the_filter_has_enough_groups(setup):
    """4 prompts offered (3 from the buffer) for 2 needed groups, 2 prompts in flight: the sampler stops once 2
    groups are complete and accepted (here: the first 2 prompts, no accuracy filter); the rows still decoding are
    dropped and the prompts not used go back to the buffer, in order. Deterministic: a second run agrees."""
    prompts, sample, _, pool = setup
    cfg = CollectConfig(batch_size=2, n=N, filter_accuracy=False, max_rounds=2)
    runs = [collect(sample, lambda k: list(prompts[3:3 + k]), list(prompts[:3]), _text, pool, cfg, seed=2)
            for _ in range(2)]
    (exp, buffer, metrics), (exp2, buffer2, metrics2) = runs
    full = sample(prompts[:4], 2, None)  # what the call would have drawn without stopping
    assert exp.prompts == prompts[:2]
    np.testing.assert_array_equal(exp.tokens, full.tokens[:2 * N])
    np.testing.assert_array_equal(exp.acc, verify(full, prompts[:2], N, _text, pool)[0][:2 * N])
    assert metrics["train/groups_unsampled"] == 2 and metrics["train/groups_kept"] == 2
    # Tokens of the rows handed over: the kept groups' and any finished rows of the unsampled prompts.
    assert exp.mask.sum() <= metrics["train/gen_tokens"] < full.lengths.sum()
    assert buffer == [prompts[2], prompts[3]]
    np.testing.assert_array_equal(exp2.tokens, exp.tokens)
    assert buffer2 == buffer and metrics2["train/groups_unsampled"] == 2


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
    verifier(np.arange(4), tokens, np.full(4, 2))
    assert not verifier.enough(cfg, 1)  # decides on the groups complete one call (a decode round) before: none
    start = time.perf_counter()
    first = verifier.enough(cfg, 1)
    early = time.perf_counter() - start
    answers = [first] + [verifier.enough(cfg, k) for k in (2, 3, 0)]
    late = time.perf_counter() - start
    acc, _, _ = verifier.finish()
    kept = int(accepted_groups(acc, np.full(4, 2), N, cfg, 2).sum())
    assert acc.tolist() == [1, 0, 1, 1] and kept == 1
    assert answers == [True, False, False, True] == [k <= kept for k in (1, 2, 3, 0)]
    assert early < 1.5 < late


def test_an_early_stop_keeps_the_decided_groups_and_waits_for_no_later_row(setup):
    """Group 0 (math, one row right: accepted) is handed over; the rows of groups 1 and 2 (code that sleeps 3 s)
    come a decode round later. `enough(1)` then decides on group 0 alone and says True; `finish` keeps group 0
    only, drops the code rows no worker has started and waits for the two that are running (3 s, not 6 s)."""
    pool = setup[3]
    code = Example([], "code", json.dumps({"prelude": "", "asserts": ["assert f()"]}), "test", "c")
    prompts = [Prompt(Example([], "math", "1", "test", "m"), (5,)), Prompt(code, (6,)), Prompt(code, (7,))]
    texts = {0: "\\boxed{1}", 1: "\\boxed{0}", 2: SLOW_CODE}
    verifier = StreamingVerifier(prompts, N, lambda ids: texts[int(ids[0])], pool)
    cfg = CollectConfig(batch_size=1, n=N)
    verifier(np.arange(2), np.array([[0, 9], [1, 9]]), np.full(2, 2))
    assert not verifier.enough(cfg, 1)
    verifier(np.arange(2, 6), np.full((4, 2), 2), np.full(4, 2))
    start = time.perf_counter()
    assert verifier.enough(cfg, 1)
    acc, _, _ = verifier.finish()
    assert time.perf_counter() - start < 4.5
    assert verifier.sampled.tolist() == [True, False, False] and acc[:2].tolist() == [1, 0]
