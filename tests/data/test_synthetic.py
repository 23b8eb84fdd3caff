"""Synthetic tasks: ground truth checked against Python's own arithmetic, reference solutions re-checked."""

import itertools
import json
import re

import pytest

from prime_jax.data.example import Example
from prime_jax.data.prompts import CODE_SUFFIX, MATH_SUFFIX, build_messages
from prime_jax.data.synthetic import (
    ChainStep,
    make_tasks,
    CodeStep,
    code_chain,
    math_chain,
    task_chain,
    reference_solution,
)


def _expr(question: str, prefix: str) -> str:
    return question.removeprefix(prefix).split(".\n\n")[0]


def test_make_tasks_is_deterministic_and_mixed():
    a = make_tasks(50, seed=7, math_frac=0.3, difficulty=2)
    assert a == make_tasks(50, seed=7, math_frac=0.3, difficulty=2)
    assert a != make_tasks(50, seed=8, math_frac=0.3, difficulty=2)
    assert sum(t.ability == "math" for t in a) == 15
    assert len({t.uid for t in a}) == 50
    assert {t.data_source for t in a} == {"synthetic_math", "synthetic_code"}
    for t in a:
        assert t.prompt[-1]["role"] == "user" and len(t.prompt) == 1  # no system prompt by default
        assert t.question().endswith(MATH_SUFFIX if t.ability == "math" else CODE_SUFFIX)
    with pytest.raises(ValueError):
        make_tasks(5, 0, difficulty=0)


@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_math_truth_matches_python_eval(difficulty):
    for t in make_tasks(60, seed=difficulty, math_frac=1.0, difficulty=difficulty):
        expr = _expr(t.question(), "Compute ")
        assert len(re.findall(r" [-+*] ", expr)) == difficulty
        assert t.ground_truth == str(eval(expr))  # the independent reference: Python itself


def test_math_reference_solution_steps_are_correct():
    for t in make_tasks(40, seed=3, math_frac=1.0, difficulty=4):
        lines = reference_solution(t).split("\n")
        assert lines[-1] == f"\\boxed{{{t.ground_truth}}}"
        assert len(lines) == 5  # one line per operation
        for line in lines[:-1]:
            lhs, rhs = line.split(" = ")
            assert eval(lhs) == int(rhs)
        assert lines[-2].endswith(f"= {t.ground_truth}")


def test_code_truth_and_reference_solution_run():
    for t in make_tasks(40, seed=4, math_frac=0.0, difficulty=3):
        tests = json.loads(t.ground_truth)
        assert tests["fn_name"] == "f" and len(tests["inputs"]) == len(tests["outputs"]) == 4
        expr = _expr(t.question(), "Write a function f(x) that returns ")
        for (x,), y in zip(tests["inputs"], tests["outputs"]):
            assert eval(expr, {"x": x}) == y
        code = re.fullmatch(r"```python\n(.*)\n```", reference_solution(t), re.S).group(1)
        namespace: dict = {}
        exec(code, namespace)
        assert [namespace["f"](*args) for args in tests["inputs"]] == tests["outputs"]


def test_reference_solution_is_short(sp_tokenizer):
    for t in make_tasks(100, seed=5, difficulty=3):
        assert len(sp_tokenizer.encode(reference_solution(t))) <= 60


def test_reference_solutions_pass_the_real_verifiers():
    from prime_jax.verifiers import code, math

    tasks = make_tasks(16, seed=6, difficulty=3)
    for t in tasks:
        verifier = math if t.ability == "math" else code
        assert verifier.score(reference_solution(t), t.ground_truth) == 1.0, t
    wrong_math = next(t for t in tasks if t.ability == "math")
    assert math.score(f"\\boxed{{{int(wrong_math.ground_truth) + 1}}}", wrong_math.ground_truth) == 0.0
    wrong_code = next(t for t in tasks if t.ability == "code")
    assert code.score("```python\ndef f(x):\n    return x\n```", wrong_code.ground_truth) < 1.0


def test_max_operand_caps_every_operand():
    tasks = make_tasks(200, seed=9, math_frac=0.5, difficulty=3, max_operand=4)
    numbers = [int(n) for t in tasks for n in re.findall(r"\d+", _expr(t.question(), "Compute " if t.ability == "math"
                                                                      else "Write a function f(x) that returns "))]
    assert max(numbers) == 4 and min(numbers) == 1
    for t in tasks:
        if t.ability == "math":
            assert t.ground_truth == str(eval(_expr(t.question(), "Compute ")))
    # 0 (default): operands grow with difficulty as they always did
    assert make_tasks(30, seed=1, difficulty=2) == make_tasks(30, seed=1, difficulty=2, max_operand=0)
    assert max(int(n) for t in make_tasks(200, seed=1, math_frac=1.0, difficulty=2)
               for n in re.findall(r"\d+", _expr(t.question(), "Compute "))) > 9
    with pytest.raises(ValueError, match="max_operand"):
        make_tasks(5, 0, max_operand=1)


def test_math_chain_is_the_left_to_right_steps_and_only_for_synthetic_math():
    def task(question, ability="math", source="synthetic_math"):
        return Example(build_messages(question, ability), ability, "", source, "u")

    assert math_chain(task("Compute (17 + 5) * 3 - 4.")) == [ChainStep(17, "+", 5, 22), ChainStep(22, "*", 3, 66),
                                                               ChainStep(66, "-", 4, 62)]
    assert [str(s) for s in math_chain(task("Compute 4 - 9 * 2."))] == ["9 * 2 = 18", "4 - 18 = -14"]  # precedence kept
    assert math_chain(task("Write a function f(x) that returns x + 1.", "code", "synthetic_code")) is None
    assert math_chain(task("Compute 1 + 2.", source="math500")) is None   # a real dataset's question
    assert code_chain(task("Write a function f(x) that returns (x + 5) * 3 - 4.", "code", "synthetic_code")) == [
        CodeStep("+", 5), CodeStep("*", 3), CodeStep("-", 4)]
    assert code_chain(task("Compute 1 + 2.")) is None
    assert task_chain(task("Compute 1 + 2.")) == [ChainStep(1, "+", 2, 3)]
    assert task_chain(task("Write a function f(x) that returns x * 2.", "code", "synthetic_code")) == [CodeStep("*", 2)]
    assert task_chain(task("Compute 1 + 2.", source="math500")) is None
    for t in make_tasks(30, seed=2, math_frac=0.5, difficulty=3):
        chain = math_chain(t)
        assert (chain is None) == (t.ability == "code")
        if chain is not None:
            assert len(chain) == 3 and str(chain[-1].value) == t.ground_truth
            assert all(a.value == b.left for a, b in itertools.pairwise(chain))   # a chain: each step starts from the last
