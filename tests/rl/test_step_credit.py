"""PRM step-credit diagnostics: hand-built responses with known first errors, hand-set token rewards, hand numbers."""

import dataclasses

import numpy as np
import pytest

from prime_jax.data.example import Example
from prime_jax.data.prompts import build_messages
from prime_jax.data.synthetic import MATH_SOURCE
from prime_jax.rl.collect import Experience, Prompt
from prime_jax.rl.step_credit import (
    credit_metrics,
    first_error_top1,
    label_rows,
    step_auroc,
    step_rewards,
)

R = 96        # response length
EOS = 0       # decodes to nothing, as a special token does


def decode(ids):
    """One character per token."""
    return "".join(chr(i) for i in ids if i != EOS)


def example(question, ability="math", source=MATH_SOURCE):
    return Example(build_messages(question, ability), ability, "", source, question)


MATH = example("Compute (17 + 5) * 3 - 4.")     # chain: 17 + 5 = 22, 22 * 3 = 66, 66 - 4 = 62
CODE = example("Write a function f(x) that returns (x + 5) * 3 - 4.", "code", "synthetic_code")

# (example, response, the reward of each step line): the line's two token rewards (v - 1 on its first character,
# 1 on its third) sum to v; newlines and the EOS get 100, which no step may count.
GROUPS = [
    (MATH, [("17 + 5 = 22\n22 * 3 = 66\n66 - 4 = 62\n\\boxed{62}", [0.5, 0.25, 0.75]),    # right, right, right
            ("17 + 5 = 22\n22 * 3 = 67\n67 - 4 = 63\n\\boxed{63}", [0.5, -0.25, 0.25])]),  # right, wrong, wrong
    (MATH, [("17 + 6 = 23\n23 * 3 = 69\n66 - 4 = 62\n\\boxed{62}", [0.25, 0.25, 1.0]),     # wrong (operand), wrong, right
            ("17 + 5 = 22\nso\n22 * 3 = 66\n\\boxed{66}", [0.0, -5.0, 0.75])]),             # right, malformed, right
    (CODE, [("17 + 5 = 99\n\\boxed{99}", [-9.0]), ("", [])]),                              # not synthetic math
    (MATH, [("17 + 5 = 23\n\\boxed{23}", [-9.0]), ("\\boxed{1}", [])]),                    # padding rows
]


def experience(groups, step_values=True):
    n = 2
    tokens = np.zeros((len(groups) * n, R), np.int32)
    mask = np.zeros((len(groups) * n, R), np.float32)
    rewards = np.zeros((len(groups) * n, R), np.float32)
    for row, (text, values) in enumerate(r for _, rows in groups for r in rows):
        tokens[row, :len(text)] = [ord(c) for c in text]
        mask[row, :len(text) + 1] = 1.0                       # + the EOS
        rewards[row, :len(text) + 1] = [100.0 if c == "\n" else 0.0 for c in text] + [100.0]
        lines = [line for line in text.split("\n") if line and "\\boxed" not in line]
        for line, v in zip(lines, values):
            start = text.index(line)
            rewards[row, start], rewards[row, start + 2] = (v - 1.0, 1.0) if step_values else (0.0, 0.0)
    trained = np.ones(len(tokens), bool)
    trained[-n:] = False
    exp = Experience([Prompt(ex, (1,)) for ex, _ in groups], np.ones((len(tokens), 1), np.int32),
                     np.ones((len(tokens), 1), np.int32), tokens, mask, np.zeros_like(rewards),
                     np.zeros(len(tokens), np.float32), trained, np.zeros(len(tokens), np.int64), n)
    return exp, rewards


def test_step_rewards_sum_the_tokens_each_line_covers():
    # tokens [0, 3), [3, 5), [5, 8), [8, 8) (no text); lines [0, 2) and [4, 8); the 5th reward is past the tokens
    got = step_rewards(np.array([1.0, 2.0, 4.0, 8.0, 16.0], np.float32), np.array([3, 5, 8, 8]), np.array([[0, 2], [4, 8]]))
    assert got.tolist() == [1.0, 6.0]          # 1; 2 + 4 (the EOS's 8 and the 16 count nowhere)
    # a token [1, 4) straddling lines [0, 2) and [3, 5) counts for both: 1 + 2, 2 + 4
    assert step_rewards(np.array([1.0, 2.0, 4.0]), np.array([1, 4, 5]), np.array([[0, 2], [3, 5]])).tolist() == [3.0, 6.0]
    assert step_rewards(np.array([1.0]), np.array([1]), np.zeros((0, 2), np.int64)).shape == (0,)


def test_step_auroc_by_hand_and_against_all_pairs():
    # pairs right > wrong: 0.5 > 0.25, 0.5 > 0; 0.25 = 0.25 (half), 0.25 > 0; 0 < 0.25, 0 = 0 (half) -> 4 / 6
    assert step_auroc(np.array([0.5, 0.25, 0.0]), np.array([0.25, 0.0])) == pytest.approx(4 / 6)
    assert step_auroc(np.zeros(3), np.zeros(2)) == 0.5
    assert step_auroc(np.array([1.0]), np.array([2.0, 3.0])) == 0.0
    assert step_auroc(np.zeros(0), np.array([1.0])) is None and step_auroc(np.array([1.0]), np.zeros(0)) is None
    rng = np.random.default_rng(0)
    for _ in range(20):
        right, wrong = np.round(rng.normal(size=rng.integers(1, 30)), 1), np.round(rng.normal(size=rng.integers(1, 30)), 1)
        d = right[:, None] - wrong[None, :]
        assert step_auroc(right, wrong) == pytest.approx(np.mean((d > 0) + 0.5 * (d == 0)))


def test_first_error_top1_by_hand():
    # located (1); tied lowest with 2 others (1/3); missed (0): top-1 (1 + 1/3 + 0) / 3; chance (1/3 + 1/4 + 1/2) / 3
    top1, chance = first_error_top1([np.array([0.0, -1.0, 2.0]), np.array([1.0, 1.0, 3.0, 1.0]), np.array([0.0, -1.0])],
                                    [1, 0, 0])
    assert top1 == pytest.approx((1 + 1 / 3 + 0) / 3) and chance == pytest.approx((1 / 3 + 1 / 4 + 1 / 2) / 3)
    assert first_error_top1([np.zeros(4), np.zeros(2)], [3, 0]) == pytest.approx((3 / 8, 3 / 8))  # all equal: chance
    assert first_error_top1([], []) is None


def test_label_rows_takes_the_trained_synthetic_rows():
    exp, _ = experience(GROUPS)
    rows = label_rows(exp, decode)
    assert [r.row for r in rows] == [0, 1, 2, 3, 4, 5]        # not the padding (6, 7)
    # the code group's responses have no `def`, so no step lines (math lines are not code steps)
    assert [r.steps.labels for r in rows] == [("right",) * 3, ("right", "wrong", "wrong"), ("wrong", "wrong", "right"),
                                              ("right", "malformed", "right"), (), ()]
    assert [r.steps.first_wrong for r in rows] == [None, 1, 0, None, None, None]
    text = GROUPS[0][1][0][0]
    assert rows[0].ends.tolist() == list(range(1, len(text) + 1)) + [len(text)]    # + the EOS, no text
    exp, _ = experience([GROUPS[0], (MATH, [])])
    real = Example(build_messages("Compute 1 + 2.", "math"), "math", "3", "math500", "q")   # a real dataset's task
    exp = dataclasses.replace(exp, prompts=[exp.prompts[0], Prompt(real, exp.prompts[1].ids)], trained=np.ones(4, bool))
    assert [r.row for r in label_rows(exp, decode)] == [0, 1]


def test_code_steps_are_labelled_and_credited():
    text = "```python\ndef f(x):\n    x = x + 5\n    x = x * 4\n    x = x - 4\n    return x\n```"   # right, wrong, right
    exp, rewards = experience([(CODE, [(text, []), ("", [])]), (MATH, [])])
    (row,) = [r for r in label_rows(exp, decode) if r.steps.labels]
    assert row.steps.labels == ("right", "wrong", "right") and row.steps.first_wrong == 1
    for (start, _), v in zip(row.steps.spans, [0.5, -1.0, 2.0]):
        rewards[0, start] = v
    got = credit_metrics([row], rewards)
    assert got["prm/step_auroc"] == 1.0                  # the one right step before it (0.5) above the first wrong (-1)
    assert got["prm/first_error_top1"] == 1.0 and got["prm/first_error_chance"] == pytest.approx(1 / 3)


def test_credit_metrics_by_hand():
    exp, rewards = experience(GROUPS)
    got = credit_metrics(label_rows(exp, decode), rewards)
    # right steps before the first wrong one: 0.5, 0.25, 0.75 (row 0); 0.5 (row 1); 0.0, 0.75 (row 3, not the
    # malformed line's -5); not row 2's 1.0, after its first wrong step; first wrong steps: -0.25 (row 1), 0.25
    # (row 2). Pairs above -0.25: 6; above 0.25: 0.5, 0.75, 0.5, 0.75 and 0.25 tied (half) -> (6 + 4.5) / 12
    assert got["prm/step_auroc"] == pytest.approx(10.5 / 12)
    # row 1: lowest of 0.5, -0.25, 0.25 is the first wrong (1); row 2: lowest of 0.25, 0.25, 1.0 tied with it (1/2)
    # -> (1 + 1/2) / 2; chance (1/3 + 1/3) / 2
    assert got["prm/first_error_top1"] == pytest.approx(0.75)
    assert got["prm/first_error_chance"] == pytest.approx(1 / 3)
    assert {k: got[k] for k in ("prm/steps_right", "prm/steps_wrong", "prm/steps_malformed", "prm/first_error_rows")} \
        == {"prm/steps_right": 7.0, "prm/steps_wrong": 4.0, "prm/steps_malformed": 1.0, "prm/first_error_rows": 2.0}


def test_all_equal_step_rewards_read_as_chance():
    exp, rewards = experience(GROUPS, step_values=False)       # every step line's tokens 0: PRM == reference
    got = credit_metrics(label_rows(exp, decode), rewards)
    assert got["prm/step_auroc"] == 0.5
    assert got["prm/first_error_top1"] == got["prm/first_error_chance"] == pytest.approx(1 / 3)  # (1/3 + 1/3) / 2


def test_without_a_class_the_metric_is_left_out():
    exp, rewards = experience([GROUPS[0], GROUPS[1]])        # the second group is the padding: rows 0, 1 only
    got = credit_metrics(label_rows(exp, decode), rewards)
    assert got["prm/first_error_rows"] == 1.0 and "prm/step_auroc" in got
    exp, rewards = experience([(MATH, [GROUPS[0][1][0], ("\\boxed{62}", [])]), GROUPS[1]])   # no wrong step
    got = credit_metrics(label_rows(exp, decode), rewards)
    assert got == {"prm/steps_right": 3.0, "prm/steps_wrong": 0.0, "prm/steps_malformed": 0.0,
                   "prm/first_error_rows": 0.0}
    assert credit_metrics([], rewards) == {"prm/steps_right": 0.0, "prm/steps_wrong": 0.0, "prm/steps_malformed": 0.0,
                                           "prm/first_error_rows": 0.0}
