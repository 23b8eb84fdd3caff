"""Code verifier: ground-truth parsing, extraction, output comparison, APPS-style cases, and the
HumanEval / MBPP reference solutions (and mutated copies) through the verifier pool."""

from __future__ import annotations

import ast
import gzip
import json
import re
import warnings
from pathlib import Path

import pytest

from prime_jax.verifiers import code
from prime_jax.verifiers.pool import VerifierPool, VerifyItem
from prime_jax.verifiers.sandbox import Limits

BENCH = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "benchmarks"
FAST = Limits(timeout_s=5.0)


def fenced(source: str) -> str:
    return f"Here is my solution.\n```python\n{source}\n```\nIt reads the input and prints the answer."


# ----------------------------------------------------------------------------- parse_tests


def test_parse_tests_formats() -> None:
    stdio = code.parse_tests('{"inputs": ["1 2\\n", ["3 4", "5"]], "outputs": ["3", ["7"]]}')
    assert (stdio.kind, stdio.inputs, stdio.outputs) == ("stdio", ("1 2\n", "3 4\n5"), ("3", "7"))
    call = code.parse_tests({"inputs": ["1\n[2, 3]", [4, "x"]], "outputs": [5, [6]], "fn_name": "f"})
    assert (call.kind, call.inputs, call.outputs, call.fn_name) == ("call", ([1, [2, 3]], [4, "x"]), (5, [6]), "f")
    asserts = code.parse_tests({"prelude": "import math", "asserts": ["assert f(1) == 2", "x = 1\nassert f(x)"]})
    assert (asserts.kind, len(asserts), asserts.prelude) == ("assert", 2, "import math")
    assert code.parse_tests({"asserts": ["assert True"]}).prelude == ""


@pytest.mark.parametrize(
    ("ground_truth", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"inputs": [], "outputs": []}, "non-empty"),
        ({"inputs": ["1"], "outputs": ["1", "2"]}, "equally long"),
        ({"inputs": "1", "outputs": ["1"]}, "must both be lists"),
        ({"inputs": [1], "outputs": ["1"]}, "inputs[0] must be a string"),
        ({"inputs": ["1"], "outputs": ["1"], "fn_name": "not an identifier"}, "fn_name"),
        ({"inputs": ["{bad"], "outputs": [1], "fn_name": "f"}, "inputs[0] is not one JSON value per line"),
        ({"asserts": []}, "non-empty list"),
        ({"asserts": ["assert f(1) =="]}, "asserts[0] is not valid Python"),
        ({"asserts": ["assert True"], "prelude": 3}, "'prelude' must be a string"),
        ({"inputs": ["1"], "outputs": ["1"], "asserts": ["assert True"]}, "either"),
        ({"tests": []}, "either"),
    ],
)
def test_parse_tests_rejects_malformed(ground_truth: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        code.parse_tests(ground_truth)


def test_extract_code() -> None:
    text = "intro\n```python\nprint(1)\n```\nthen a fix:\n```python\nprint(2)\n```\nbye"
    assert code.extract_code(text) == "\nprint(2)\n"
    assert code.extract_code("print(3)") == "print(3)"
    assert code.extract_code("```python\nprint(4)") == "\nprint(4)"  # cut off before the closing fence


# ----------------------------------------------------------------------------- comparisons


@pytest.mark.parametrize(
    ("output", "expected", "match"),
    [
        ("3\n", "3", True),
        ("  3  \n\n", "3\n", True),
        ("1 2\n3 4 \n", "1 2\n\n3 4", True),  # stripped non-empty lines
        ("1\n2\n3\n", "1 2 3", True),  # whitespace tokens
        ("0.3333333333333333\n", "0.333333", True),  # floats, numpy.allclose tolerances
        ("0.3334\n", "0.333333", False),
        ("1e5", "100000", True),
        ("YES", "yes", False),
        ("2 1", "1 2", False),  # order matters (no set-of-tokens match)
        ("1 2", "1 2 3", False),
        ("", "0", False),
    ],
)
def test_stdout_matches(output: str, expected: str, match: bool) -> None:
    assert code.stdout_matches(output, expected) is match


@pytest.mark.parametrize(
    ("output_json", "expected", "match"),
    [
        ("6", 6, True),
        ("6", [6], True),  # APPS wraps the return value in a list
        ("[1, 2]", [1, 2], True),
        ("[1, 2]", [[1, 2]], True),
        ("[2, 1]", [1, 2], False),
        ("0.30000000000000004", 0.3, True),
        ("0.31", 0.3, False),
        ('"abc"', "abc", True),
        ("[1, 2]", "[1, 2]", True),  # expected given as JSON text
        ('{"a": 1.0}', {"a": 1}, True),
        ("true", True, True),
        ("null", 0, False),
        ("not json", 1, False),
    ],
)
def test_return_value_matches(output_json: str, expected: object, match: bool) -> None:
    assert code.return_value_matches(output_json, expected) is match


# ----------------------------------------------------------------------------- APPS-style cases

SUM_TESTS = json.dumps({"inputs": ["1 2\n", "10 -3\n", "0 0\n", "5 5\n"], "outputs": ["3\n", "7\n", "0\n", "10\n"]})


@pytest.mark.parametrize(
    ("program", "expected"),
    [
        ("a, b = map(int, input().split())\nprint(a + b)", 1.0),
        ("import sys\na, b = map(int, sys.stdin.buffer.read().split())\nsys.stdout.write(f'{a + b}\\n')", 1.0),
        ("a, b = map(int, open(0).read().split())\nprint(a + b)\nexit()", 1.0),
        (  # the threaded deep-recursion idiom of competitive programmers
            "import sys, threading\ndef main():\n    a, b = map(int, input().split())\n    print(a + b)\n"
            "threading.stack_size(1 << 25)\nthreading.Thread(target=main).start()",
            1.0,
        ),
        ("a, b = map(int, input().split())\nprint(a * b)", 0.25),  # 2, -30, 0, 25: only "0 0" right
        ("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)", 0.5),
        ("a, b = map(int, input().split())\nprint(a + b if a != 10 else 1 / 0)", 0.75),
        ("a, b = map(int, input().split()\nprint(a + b)", 0.0),  # syntax error
        ("", 0.0),
    ],
)
def test_stdio_programs(program: str, expected: float) -> None:
    assert code.score(fenced(program), SUM_TESTS, FAST) == expected


def test_stdio_only_first_ten_tests_count() -> None:
    """11 tests; the reference scores passed/min(n, 10) over the first ten."""
    numbers = list(range(11))
    tests = {"inputs": [f"{n}\n" for n in numbers], "outputs": [f"{n * n}\n" for n in numbers]}
    assert code.score(fenced("n = int(input())\nprint(n * n if n < 10 else -1)"), tests, FAST) == 1.0
    assert code.score(fenced("n = int(input())\nprint(n * n if n > 0 else -1)"), tests, FAST) == 0.9
    assert code.score(fenced("n = int(input())\nprint(n * n)"), tests, FAST) == 1.0


def test_stdio_hanging_test_fails_only_itself() -> None:
    program = "n = int(input())\nwhile n == 2:\n    pass\nprint(n * n)"
    tests = {"inputs": ["1", "2", "3", "4"], "outputs": ["1", "4", "9", "16"]}
    assert code.score(fenced(program), tests, Limits(timeout_s=1.0)) == 0.75


@pytest.mark.parametrize(
    ("program", "tests", "expected"),
    [
        ("def add(a, b):\n    return a + b", {"inputs": ["1\n2", "3\n4"], "outputs": [3, 7], "fn_name": "add"}, 1.0),
        ("def add(a, b):\n    return a - b", {"inputs": ["1\n2", "3\n4"], "outputs": [3, 7], "fn_name": "add"}, 0.0),
        (
            "class Solution:\n    def total(self, nums: List[int]) -> int:\n        return sum(nums)",
            {"inputs": [[[1, 2, 3]], [[4]], [[]]], "outputs": [[6], [4], [0]], "fn_name": "total"},
            1.0,
        ),
        (
            "class Solution:\n    def total(self, nums):\n        return max(nums)",
            {"inputs": [[[1, 2, 3]], [[4]], [[]]], "outputs": [6, 4, 0], "fn_name": "total"},
            1 / 3,
        ),
        (
            "def pair(x):\n    return (x, x / 3)",
            {"inputs": [[1], [2]], "outputs": [[1, 0.333333333], [2, 0.666666667]], "fn_name": "pair"},
            1.0,
        ),
        ("def other(x):\n    return x", {"inputs": [[1]], "outputs": [1], "fn_name": "f"}, 0.0),
    ],
)
def test_call_based(program: str, tests: dict, expected: float) -> None:
    assert code.score(fenced(program), json.dumps(tests), FAST) == pytest.approx(expected)


def test_assert_style_partial_credit() -> None:
    asserts = ["assert f(4) == 2", "assert f(9) == 3", "assert f(2) == math.sqrt(2)"]
    tests = {"prelude": "import math", "asserts": asserts}
    assert code.score(fenced("def f(x):\n    return int(x ** 0.5)"), tests, FAST) == pytest.approx(2 / 3)
    assert code.score(fenced("def f(x):\n    return x ** 0.5"), tests, FAST) == 1.0


def test_malformed_ground_truth_raises() -> None:
    with pytest.raises(ValueError, match="equally long"):
        code.score("print(1)", {"inputs": ["1"], "outputs": []})


# ----------------------------------------------------------------------------- HumanEval / MBPP

_FLIPPED = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot,
    ast.IsNot: ast.Is, ast.And: ast.Or, ast.Or: ast.And,
}  # fmt: skip


def mutate(source: str, first_line: int = 1) -> str:
    """`source` with its first operator at or after `first_line` flipped (+/-, </>=, ==/!=, and/or, ...);
    if it has none, its first `return x` becomes `return None`."""
    with warnings.catch_warnings():  # some MBPP solutions have invalid escapes in regex strings
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    operators = sorted(
        (n for n in ast.walk(tree) if isinstance(n, (ast.BinOp, ast.Compare, ast.BoolOp)) and n.lineno >= first_line),
        key=lambda n: (n.lineno, n.col_offset),
    )
    for node in operators:
        if isinstance(node, ast.Compare) and type(node.ops[0]) in _FLIPPED:
            node.ops[0] = _FLIPPED[type(node.ops[0])]()
            return ast.unparse(tree)
        if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in _FLIPPED:
            node.op = _FLIPPED[type(node.op)]()
            return ast.unparse(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and node.value is not None and node.lineno >= first_line:
            node.value = ast.Constant(None)
            return ast.unparse(tree)
    raise ValueError("nothing to mutate")


def test_mutate() -> None:
    assert mutate("def f(a, b):\n    return a + b * 2") == "def f(a, b):\n    return a - b * 2"
    assert mutate("def f(x):\n    if x < 3:\n        return 1\n    return 0") == (
        "def f(x):\n    if x >= 3:\n        return 1\n    return 0"
    )
    assert mutate("def f(x):\n    return [x]") == "def f(x):\n    return None"


def _reference_solutions() -> list[tuple[str, str, str, int]]:
    """(name, program, ground truth JSON, first line of the solution body) for HumanEval and MBPP."""
    rows = []
    with gzip.open(BENCH / "humaneval.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            truth = {"prelude": r["test"], "asserts": [f"check({r['entry_point']})"]}
            program, first_line = r["prompt"] + r["canonical_solution"], r["prompt"].count("\n") + 1
            rows.append((r["task_id"], program, json.dumps(truth), first_line))
    for r in json.loads((BENCH / "mbpp.json").read_text()):
        truth = {"prelude": "\n".join(r["test_imports"]), "asserts": r["test_list"]}
        rows.append((f"MBPP/{r['task_id']}", r["code"], json.dumps(truth), 1))
    return rows


def test_humaneval_and_mbpp_reference_solutions_pass_and_mutants_fail() -> None:
    rows = _reference_solutions()
    assert len(rows) == 164 + 399
    originals = [VerifyItem(fenced(program), "code", truth) for _, program, truth, _ in rows]
    mutants = [VerifyItem(fenced(mutate(program, first)), "code", truth) for _, program, truth, first in rows]
    # Generous per-test time for the reference solutions: a few run for seconds on a loaded 2-core host. A mutant
    # that loops forever fails at any limit: a short one.
    with VerifierPool(2, item_timeout_s=120, batch_timeout_s=900, code_limits=Limits(timeout_s=30.0)) as pool:
        result = pool.score_batch(originals)
    with VerifierPool(2, item_timeout_s=120, batch_timeout_s=900, code_limits=Limits(timeout_s=3.0)) as pool:
        mutated = pool.score_batch(mutants).scores
    failed = [name for (name, *_), s in zip(rows, result.scores) if s != 1.0]
    assert failed == [], f"reference solutions not scored 1.0: {failed}"
    assert sum(result.counts.values()) == 0
    caught = float((mutated < 1.0).mean())
    print(f"\nmutants scored below 1.0: {caught:.1%} of {len(rows)}")
    assert caught >= 0.95
