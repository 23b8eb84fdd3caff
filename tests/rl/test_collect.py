"""Streaming verification: the sampler hands rows to the verifier pool as they stop; the scores equal those of
verifying the finished rollout in one batch, and `collect` logs the verification time decoding did not hide."""

import json
import time

import numpy as np
import pytest

from prime_jax.data.example import Example
from prime_jax.rl.collect import CollectConfig, Prompt, StreamingVerifier, accepted_groups, collect, verify
from prime_jax.models import load_pretrained
from prime_jax.verifiers.pool import VerifierPool
from prime_jax.sampling import Rollout, generate

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
    only, drops the code rows no worker has taken yet and waits for the two that are running (3 s, not 6 s)."""
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


def _scripted_sampler(right: list[list[int]], per_call: int):
    """A sampler without a model: group g's row j answers `right[g][j]` (1: right); each decode round hands the
    next `per_call` groups' rows to `on_rows`, then asks `stop`, as `Sampler.__call__` does."""

    def sample(prompts, seed, on_rows, stop):
        rows = len(prompts) * N
        tokens = np.tile(np.array([[0, 9]]), (rows, 1))
        tokens[:, 0] = np.asarray(right[:len(prompts)]).reshape(-1)
        lengths = np.zeros(rows, np.int32)
        for first in range(0, len(prompts), per_call):
            handed = np.arange(first * N, min(len(prompts), first + per_call) * N)
            lengths[handed] = 2
            on_rows(handed, tokens[handed], lengths[handed])
            if stop():
                break
        mask = (np.arange(2)[None] < lengths[:, None]).astype(np.int32)
        return Rollout(np.ones((rows, 1), np.int32), np.ones((rows, 1), np.int32), tokens,
                       np.zeros((rows, 2), np.float32), mask, lengths)

    return sample


def _math_prompts(names: str) -> list[Prompt]:
    return [Prompt(Example([], "math", "1", "test", name), (i + 5,)) for i, name in enumerate(names)]


def test_collect_takes_the_first_accepted_groups_and_requeues_the_rest_in_order(setup):
    """6 prompts offered (1 from the buffer) for 2 groups, 2 groups handed over per decode round. Groups 0, 2, 3
    are accepted (one row of two right), group 1 rejected (both right). The third round's decision sees groups
    0-3: the batch is groups 0 and 2; group 1 is used up; surplus group 3 and groups 4-5, handed over after the
    decision, go back to the buffer in order."""
    pool = setup[3]
    prompts = _math_prompts("abcdef")
    right = [[1, 0], [1, 1], [0, 1], [1, 0], [0, 1], [1, 0]]
    cfg = CollectConfig(batch_size=2, n=N, max_rounds=3)
    exp, buffer, metrics = collect(_scripted_sampler(right, 2), lambda k: prompts[1:1 + k], prompts[:1],
                                   lambda ids: "\\boxed{%d}" % ids[0], pool, cfg, seed=0)
    assert exp.prompts == [prompts[0], prompts[2]] and exp.acc.tolist() == [1, 0, 0, 1] and exp.trained.all()
    assert exp.tokens[:, 0].tolist() == [1, 0, 0, 1]
    assert buffer == prompts[3:]
    assert (metrics["train/groups_sampled"], metrics["train/groups_kept"], metrics["train/groups_padding"],
            metrics["train/groups_unsampled"], metrics["train/prompt_buffer"]) == (4, 2, 0, 2, 3)
    assert metrics["train_verify_score/all"] == 5 / 8


def test_collect_pads_with_rejected_groups_when_the_offer_runs_out(setup):
    """2 prompts offered for 2 groups, one accepted: the call decodes both; the batch is the accepted group, then
    the rejected one as padding that carries no loss; nothing goes back to the buffer."""
    pool = setup[3]
    prompts = _math_prompts("ab")
    cfg = CollectConfig(batch_size=2, n=N, max_rounds=1)
    exp, buffer, metrics = collect(_scripted_sampler([[1, 0], [0, 0]], 1), lambda k: prompts[:k], [],
                                   lambda ids: "\\boxed{%d}" % ids[0], pool, cfg, seed=0)
    assert exp.prompts == prompts and exp.trained.tolist() == [True, True, False, False] and buffer == []
    assert metrics["train/groups_kept"] == 1 and metrics["train/groups_padding"] == 1
