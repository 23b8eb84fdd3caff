"""Synthetic math and code tasks for the built-in CPU run: no downloads, verifiable, tunable difficulty.

Math: "Compute (17 + 5) * 3 - 4." with the integer result as ground truth (`\\boxed{}` answers).
Code: "Write a function f(x) that returns (x + 5) * 3 - 4." with APPS call-based ground truth
`{"fn_name": "f", "inputs": [[x], ...], "outputs": [f(x), ...]}`.
`difficulty` = number of operations in the expression; operands grow with it (additive operands
up to 10 * difficulty, multipliers 2..9) unless `max_operand` caps them (multipliers 2..min(9, max_operand)). `reference_solution` writes a short correct response in
the form the verifiers accept, for the supervised warm start of a tiny model; `task_chain` gives a task's steps in
order (what `prime_jax.data.steps` checks a response's step lines against): `ChainStep`s of a math task, `CodeStep`s
of a code task (its step-by-step solution assigns one operation a line, `x = x + 5`).
"""

from __future__ import annotations

import ast
import json
import random
import re
from typing import NamedTuple

from prime_jax.data.example import Example
from prime_jax.data.prompts import build_messages

_MATH_PREFIX = "Compute "
_CODE_PREFIX = "Write a function f(x) that returns "
_NUM_CODE_TESTS = 4
_OP_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}
MATH_SOURCE = "synthetic_math"
CODE_SOURCE = "synthetic_code"


class ChainStep(NamedTuple):
    """One operation of a chain, `left op right = value`; str() is its line in `reference_solution`."""

    left: int
    op: str
    right: int
    value: int

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right} = {self.value}"


class CodeStep(NamedTuple):
    """One operation of a code task's chain, applied to `x`; str() is its line in a step-by-step solution."""

    op: str
    right: int

    def __str__(self) -> str:
        return f"x = x {self.op} {self.right}"


def random_expression(rng: random.Random, num_ops: int, max_operand: int, start: str, max_multiplier: int = 9) -> str:
    """A left-to-right chain `start op a op b ...` with parentheses wherever `*` follows `+`/`-`.

    The written order is the evaluation order, so a step-by-step solution reads left to right.
    """
    expr, additive = start, False
    for _ in range(num_ops):
        op = rng.choice("+-*")
        if op == "*":
            operand = rng.randint(2, max_multiplier)
            expr = f"({expr}) * {operand}" if additive else f"{expr} * {operand}"
        else:
            expr = f"{expr} {op} {rng.randint(1, max_operand)}"
        additive = op != "*"
    return expr


def _evaluate(node: ast.expr, x: int | None, steps: list[ChainStep] | None) -> int:
    """Integer value of an expression tree of + - * over ints (and `x`), recording its steps in evaluation order."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name) and node.id == "x" and x is not None:
        return x
    if isinstance(node, ast.BinOp) and type(node.op) in _OP_SYMBOLS:
        a, b = _evaluate(node.left, x, steps), _evaluate(node.right, x, steps)
        symbol = _OP_SYMBOLS[type(node.op)]
        value = a + b if symbol == "+" else a - b if symbol == "-" else a * b
        if steps is not None:
            steps.append(ChainStep(a, symbol, b, value))
        return value
    raise ValueError(f"not a synthetic arithmetic expression: {ast.dump(node)}")


def evaluate(expression: str, x: int | None = None) -> int:
    """Value of a synthetic expression (`x` bound for code tasks)."""
    return _evaluate(ast.parse(expression, mode="eval").body, x, None)


def _math_task(rng: random.Random, difficulty: int, max_operand: int) -> tuple[str, str]:
    expr = random_expression(rng, difficulty, max_operand, str(rng.randint(1, max_operand)), min(9, max_operand))
    return f"{_MATH_PREFIX}{expr}.", str(evaluate(expr))


def _code_task(rng: random.Random, difficulty: int, max_operand: int) -> tuple[str, str]:
    expr = random_expression(rng, difficulty, max_operand, "x", min(9, max_operand))
    xs = rng.sample(range(-10, 21), _NUM_CODE_TESTS)
    tests = {"fn_name": "f", "inputs": [[x] for x in xs], "outputs": [evaluate(expr, x) for x in xs]}
    return f"{_CODE_PREFIX}{expr}.", json.dumps(tests)


def make_tasks(
    n: int,
    seed: int,
    *,
    math_frac: float = 0.5,
    difficulty: int = 2,
    max_operand: int = 0,
    system_prompt: str | None = None,
) -> list[Example]:
    """`n` tasks, round(n * math_frac) of them math, in a seeded random order; same args, same tasks.

    `max_operand` 0 (default) lets operands grow with `difficulty` (up to 10 * difficulty); a value >= 2
    caps them, for chains of many small steps.

    `system_prompt` None (default) leaves the system message out to keep tiny-model prompts short.
    """
    if n < 0 or not 0.0 <= math_frac <= 1.0 or difficulty < 1 or max_operand < 0 or max_operand == 1:
        raise ValueError(f"need n >= 0, 0 <= math_frac <= 1, difficulty >= 1, max_operand 0 or >= 2; "
                         f"got {n}, {math_frac}, {difficulty}, {max_operand}")
    max_operand = max_operand or 10 * difficulty
    rng = random.Random(seed)
    n_math = round(n * math_frac)
    abilities = ["math"] * n_math + ["code"] * (n - n_math)
    rng.shuffle(abilities)
    tasks = []
    for i, ability in enumerate(abilities):
        question, truth = (_math_task if ability == "math" else _code_task)(rng, difficulty, max_operand)
        tasks.append(
            Example(
                prompt=build_messages(question, ability, system_prompt=system_prompt),
                ability=ability,
                ground_truth=truth,
                data_source=MATH_SOURCE if ability == "math" else CODE_SOURCE,
                uid=f"synthetic-{seed}-{i}",
            )
        )
    return tasks


def _expression_of(example: Example) -> str:
    prefix = _MATH_PREFIX if example.ability == "math" else _CODE_PREFIX
    match = re.match(re.escape(prefix) + r"(.+?)\.(\n|$)", example.question())
    if match is None:
        raise ValueError(f"{example.uid} is not a synthetic task: {example.question()[:80]!r}")
    return match.group(1)


def math_chain(example: Example) -> list[ChainStep] | None:
    """The steps of a synthetic math task's chain in evaluation order (the written order: `random_expression` writes
    left-to-right chains); None for any other example (code tasks, real datasets: told apart by `data_source`)."""
    if example.data_source != MATH_SOURCE:
        return None
    steps: list[ChainStep] = []
    _evaluate(ast.parse(_expression_of(example), mode="eval").body, None, steps)
    return steps


def _code_ops(node: ast.expr) -> list[CodeStep]:
    if isinstance(node, ast.Name) and node.id == "x":
        return []
    if (isinstance(node, ast.BinOp) and type(node.op) in _OP_SYMBOLS and isinstance(node.right, ast.Constant)
            and isinstance(node.right.value, int)):
        return _code_ops(node.left) + [CodeStep(_OP_SYMBOLS[type(node.op)], node.right.value)]
    raise ValueError(f"not a left-to-right chain on x: {ast.dump(node)}")


def code_chain(example: Example) -> list[CodeStep] | None:
    """The operations of a synthetic code task's chain on `x`, in order ("(x + 5) * 3" -> x = x + 5, x = x * 3);
    None for any other example."""
    if example.data_source != CODE_SOURCE:
        return None
    return _code_ops(ast.parse(_expression_of(example), mode="eval").body)


def task_chain(example: Example) -> list[ChainStep] | list[CodeStep] | None:
    """`math_chain` or `code_chain`, whichever applies; None for examples that are not synthetic."""
    return math_chain(example) or code_chain(example)


def reference_solution(example: Example, *, code_steps: bool = False) -> str:
    """A correct, short response: math = one line per operation then `\\boxed{N}`; code = a fenced `def f(x)` that
    returns the expression, or with `code_steps` assigns one operation a line (`x = x + 5`) and returns x."""
    steps = math_chain(example)
    if steps is not None:
        return "\n".join(map(str, steps)) + f"\n\\boxed{{{steps[-1].value}}}"
    if code_steps:
        body = "".join(f"    {step}\n" for step in code_chain(example))
        return f"```python\ndef f(x):\n{body}    return x\n```"
    return f"```python\ndef f(x):\n    return {_expression_of(example)}\n```"
