"""`collect`: one sampler call per step whose rows the verifiers score while it decodes; it keeps the scores, stops
once the online filter has accepted enough groups, takes the first accepted groups, pads with rejected ones when the
offer runs out, re-queues the prompts it did not use in order, and logs the verification time decoding did not hide.
(The streaming verifier itself: tests/verifiers/test_streaming.py.)"""

import numpy as np
import pytest

from prime_jax.data.example import Example
from prime_jax.rl.collect import CollectConfig, Prompt, collect
from prime_jax.sampling import Rollout
from prime_jax.verifiers.pool import VerifierPool
from prime_jax.verifiers.streaming import verify
from tests.fixtures import answer_text, toy_sampler

N = 2


@pytest.fixture(scope="module")
def setup(qwen2_dir):
    prompts, sample, calls = toy_sampler(qwen2_dir, N)
    with VerifierPool(2, item_timeout_s=30.0, batch_timeout_s=120.0) as pool:
        yield prompts, sample, calls, pool


def test_collect_keeps_the_scores_and_logs_exposed_verification(setup):
    prompts, sample, _, pool = setup
    stream = iter(prompts * 10)
    cfg = CollectConfig(batch_size=3, n=N, filter_accuracy=False, max_rounds=1)
    exp, buffer, metrics = collect(sample, lambda k: [next(stream) for _ in range(k)], [], answer_text, pool, cfg,
                                   seed=1, version=0)
    again = sample(prompts[:3], 1, None)  # the step's one sampler call, seed 1
    np.testing.assert_array_equal(exp.tokens, again.tokens)
    np.testing.assert_array_equal(exp.acc, verify(again, prompts[:3], N, answer_text, pool)[0])
    assert buffer == [] and metrics["train/groups_sampled"] == 3 and metrics["train/gen_tokens"] == again.lengths.sum()
    assert 0 <= metrics["timing/verify_exposed"] and 0 <= metrics["timing/verify"]


def test_collect_stops_sampling_once_the_filter_has_enough_groups(setup):
    """4 prompts offered (3 from the buffer) for 2 needed groups, 2 prompts in flight: the sampler stops once 2
    groups are complete and accepted (here: the first 2 prompts, no accuracy filter); the rows still decoding are
    dropped and the prompts not used go back to the buffer, in order. Deterministic: a second run agrees."""
    prompts, sample, _, pool = setup
    cfg = CollectConfig(batch_size=2, n=N, filter_accuracy=False, max_rounds=2)
    runs = [collect(sample, lambda k: list(prompts[3:3 + k]), list(prompts[:3]), answer_text, pool, cfg, seed=2,
                    version=0)
            for _ in range(2)]
    (exp, buffer, metrics), (exp2, buffer2, metrics2) = runs
    full = sample(prompts[:4], 2, None)  # what the call would have drawn without stopping
    assert exp.prompts == prompts[:2]
    np.testing.assert_array_equal(exp.tokens, full.tokens[:2 * N])
    np.testing.assert_array_equal(exp.acc, verify(full, prompts[:2], N, answer_text, pool)[0][:2 * N])
    assert metrics["train/groups_unsampled"] == 2 and metrics["train/groups_kept"] == 2
    # Tokens of the rows handed over: the kept groups' and any finished rows of the unsampled prompts.
    assert exp.mask.sum() <= metrics["train/gen_tokens"] < full.lengths.sum()
    assert buffer == [prompts[2], prompts[3]]
    np.testing.assert_array_equal(exp2.tokens, exp.tokens)
    assert buffer2 == buffer and metrics2["train/groups_unsampled"] == 2


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
                                   lambda ids: "\\boxed{%d}" % ids[0], pool, cfg, seed=0, version=7)
    assert exp.version.tolist() == [7] * 4  # every row carries the version that sampled it
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
                                   lambda ids: "\\boxed{%d}" % ids[0], pool, cfg, seed=0, version=0)
    assert exp.prompts == prompts and exp.trained.tolist() == [True, True, False, False] and buffer == []
    assert metrics["train/groups_kept"] == 1 and metrics["train/groups_padding"] == 1
