"""Step labels of synthetic math and code responses: hand-built responses with known labels, spans and first errors."""

import numpy as np
import pytest

from prime_jax.data.example import Example
from prime_jax.data.prompts import build_messages
from prime_jax.data.steps import label_steps, step_lines
from prime_jax.data.synthetic import (
    CODE_SOURCE,
    MATH_SOURCE,
    code_chain,
    make_tasks,
    math_chain,
    reference_solution,
)


def math_task(expression: str) -> Example:
    return Example(prompt=build_messages(f"Compute {expression}.", "math"), ability="math", ground_truth="",
                   data_source=MATH_SOURCE, uid=expression)


CHAIN = math_chain(math_task("(17 + 5) * 3 - 4"))   # 17 + 5 = 22, 22 * 3 = 66, 66 - 4 = 62


@pytest.mark.parametrize("text, labels, first_wrong", [
    # the right chain
    ("17 + 5 = 22\n22 * 3 = 66\n66 - 4 = 62\n\\boxed{62}", ("right", "right", "right"), None),
    # a wrong arithmetic step; carrying its value on is wrong too
    ("17 + 5 = 22\n22 * 3 = 67\n67 - 4 = 63\n\\boxed{63}", ("right", "wrong", "wrong"), 1),
    # a wrong operand copied (the arithmetic is right), then back on the chain
    ("17 + 5 = 22\n23 * 3 = 69\n66 - 4 = 62\n\\boxed{62}", ("right", "wrong", "right"), 1),
    # a wrong operator; then the chain's next step is right again
    ("17 + 5 = 22\n22 + 3 = 25\n66 - 4 = 62\n\\boxed{62}", ("right", "wrong", "right"), 1),
    # a skipped step: the second well-formed step is not the chain's second
    ("17 + 5 = 22\n66 - 4 = 62\n\\boxed{62}", ("right", "wrong"), 1),
    # a step past the chain's end
    ("17 + 5 = 22\n22 * 3 = 66\n66 - 4 = 62\n62 + 0 = 62\n\\boxed{62}", ("right", "right", "right", "wrong"), 3),
    # malformed lines take no chain position; spaces around the operators are optional
    ("17+5=22\nso\n22 * 3 = 66\n66 - = 62\n66 - 4 = 62 .\n66 -4 = 62\n\\boxed{62}",
     ("right", "malformed", "right", "malformed", "malformed", "right"), None),
    # a malformed line before a wrong step: first_wrong indexes all step lines
    ("1 7 + 5 = 22\n17 + 5 = 21\n\\boxed{21}", ("malformed", "wrong"), 1),
    # no step lines at all; lines after the answer are not steps
    ("\\boxed{62}", (), None),
    ("", (), None),
    ("17 + 5 = 22\n\\boxed{22} 22 * 3 = 66\n22 * 3 = 66", ("right",), None),
])
def test_labels_and_first_wrong(text, labels, first_wrong):
    got = label_steps(CHAIN, text)
    assert got.labels == labels and got.first_wrong == first_wrong
    assert got.spans.shape == (len(labels), 2)
    assert (got.count("right"), got.count("wrong"), got.count("malformed")) == tuple(
        labels.count(k) for k in ("right", "wrong", "malformed"))


def test_spans_are_the_lines_without_surrounding_whitespace():
    text = "  17 + 5 = 22  \nthe next step\n22 * 3 = 66\n\n\t66 - = 62\n66 - 4 = 62\n\\boxed{62}\n"
    got = label_steps(CHAIN, text)
    # line starts: 0, 16 (15 chars + "\n"), 30, 42 (blank), 43, 54; "  17..." starts 2 in, "\t66..." 1 in
    assert got.spans.tolist() == [[2, 13], [16, 29], [30, 41], [44, 53], [54, 65]]
    assert [text[a:b] for a, b in got.spans] == ["17 + 5 = 22", "the next step", "22 * 3 = 66", "66 - = 62",
                                                 "66 - 4 = 62"]
    assert got.labels == ("right", "malformed", "right", "malformed", "right")
    assert step_lines(text) == [tuple(s) for s in got.spans.tolist()]


def test_negative_intermediate_values():
    chain = math_chain(math_task("(3 - 5) * 2"))     # 3 - 5 = -2, -2 * 2 = -4
    assert label_steps(chain, "3 - 5 = -2\n-2 * 2 = -4\n\\boxed{-4}").labels == ("right", "right")
    assert label_steps(chain, "3 - 5 = 2\n2 * 2 = 4\n\\boxed{4}").labels == ("wrong", "wrong")


def test_reference_solutions_are_all_right():
    for t in make_tasks(60, seed=11, math_frac=1.0, difficulty=4):
        got = label_steps(math_chain(t), reference_solution(t))
        assert got.labels == ("right",) * 4 and got.first_wrong is None
        assert np.all(got.spans[:, 1] > got.spans[:, 0])


def code_task(expression: str) -> Example:
    return Example(prompt=build_messages(f"Write a function f(x) that returns {expression}.", "code"), ability="code",
                   ground_truth="", data_source=CODE_SOURCE, uid=expression)


CODE_CHAIN = code_chain(code_task("(x + 5) * 3 - 4"))   # x = x + 5, x = x * 3, x = x - 4
RIGHT_CODE = "```python\ndef f(x):\n    x = x + 5\n    x = x * 3\n    x = x - 4\n    return x\n```"


@pytest.mark.parametrize("text, labels, first_wrong", [
    (RIGHT_CODE, ("right", "right", "right"), None),
    # a wrong operand, then back on the chain; spaces optional
    ("```python\ndef f(x):\n    x=x+5\n    x = x * 4\n    x = x - 4\n    return x\n```", ("right", "wrong", "right"), 1),
    # a skipped step; a line in another form is malformed and takes no chain position
    ("```python\ndef f(x):\n    y = x + 5\n    x = x + 5\n    x = x - 4\n    return x\n```",
     ("malformed", "right", "wrong"), 2),
    # a step past the chain's end
    (RIGHT_CODE.replace("    return", "    x = x + 1\n    return"), ("right", "right", "right", "wrong"), 3),
    # the one-line form has no step lines; nor has text without a def; lines after return or the fence are no steps
    ("```python\ndef f(x):\n    return (x + 5) * 3 - 4\n```", (), None),
    ("x = x + 5", (), None),
    ("def f(x):\n    x = x + 5\n```\nx = x * 3", ("right",), None),
    ("def f(x):\n    x = x + 5\n    return x\n    x = x * 3", ("right",), None),
])
def test_code_labels_and_first_wrong(text, labels, first_wrong):
    got = label_steps(CODE_CHAIN, text)
    assert got.labels == labels and got.first_wrong == first_wrong
    assert [text[a:b].strip() == text[a:b] and "\n" not in text[a:b] for a, b in got.spans] == [True] * len(labels)


def test_code_spans_are_the_step_lines():
    got = label_steps(CODE_CHAIN, RIGHT_CODE)
    assert [RIGHT_CODE[a:b] for a, b in got.spans] == ["x = x + 5", "x = x * 3", "x = x - 4"]
    assert step_lines(RIGHT_CODE, code=True) == [tuple(s) for s in got.spans.tolist()]


def test_code_reference_solutions_are_all_right_and_pass_their_tests():
    import json

    for t in make_tasks(40, seed=5, math_frac=0.0, difficulty=3):
        solution = reference_solution(t, code_steps=True)
        got = label_steps(code_chain(t), solution)
        assert got.labels == ("right",) * 3 and got.first_wrong is None
        namespace: dict = {}
        exec(solution.removeprefix("```python\n").removesuffix("\n```"), namespace)   # noqa: S102 (our own code)
        tests = json.loads(t.ground_truth)
        assert [namespace["f"](*args) for args in tests["inputs"]] == tests["outputs"]
