"""Code outcome verifier: run a response's Python code against the ground-truth tests.

Ground truth (a contract the data loaders rely on) is a JSON string, or the parsed dict, of one of:
- APPS/TACO `{"inputs": [...], "outputs": [...], "fn_name"?: str}`. Without `fn_name` the code is
  a stdin/stdout program and each input/output is a text (or a list of lines). With `fn_name`
  the code defines that function (or a `class Solution` method); each input is a string with one
  JSON value per line (the positional arguments) or a list of arguments; outputs are JSON values.
- assert-style `{"prelude": str, "asserts": [str, ...]}`: `prelude` (imports, helpers such as
  HumanEval's `def check(candidate): ...`) runs after the code; each assert entry is one test.

Scoring follows the reference (docs/prime_spec.md §2.2): the reference runs all tests in one process and
returns 1.0 if all pass, else runs the first 10 one at a time and returns passed / min(#tests, 10).
Tests after the tenth cannot change that score (when the first ten pass it is 1.0 either way), so
only the first min(#tests, 10) tests are run, in one sandboxed process; a test that crashes or
hangs is failed and a fresh process continues with the next (see `sandbox.run_tests`); each test
has the reference's 5 s wall-clock limit unless `Limits` says otherwise.
Outputs are compared on the host, leniently as the reference does: stripped text, stripped
non-empty lines, whitespace-separated tokens, then tokens as floats with numpy.allclose tolerances.
(The reference's order-insensitive set-of-tokens match is left out: it accepts permuted outputs.)
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from prime_jax.verifiers.sandbox import Limits, Program, TestResult, run_tests

MAX_SCORED_TESTS = 10
_FENCE_OPEN, _FENCE_CLOSE = "```python", "```"
# Runs before every program, in its namespace: the modules the reference's execution prelude
# imports (docs/prime_spec.md §2.2), plus their names that solutions commonly use without importing.
HEADER = """\
from typing import *
import bisect, collections, copy, datetime, functools, heapq, io, itertools, json, math, operator
import random, re, statistics, string, sys
from bisect import bisect_left, bisect_right, insort
from collections import Counter, OrderedDict, defaultdict, deque
from functools import cache, cmp_to_key, lru_cache, reduce
from heapq import heapify, heappop, heappush, heappushpop, heapreplace
from itertools import accumulate, combinations, permutations, product
from math import ceil, comb, floor, gcd, inf, isqrt, log, log2, sqrt
"""
# numpy.allclose defaults, used for tokens that parse as floats.
_RTOL, _ATOL = 1e-5, 1e-8


@dataclasses.dataclass(frozen=True)
class Tests:
    """Validated ground truth. kind "stdio" | "call" | "assert".

    stdio: `inputs` are stdin texts, `outputs` expected stdout texts.
    call: `inputs` are positional-argument lists for `fn_name`, `outputs` the expected JSON values.
    assert: `inputs` are assert statements (no outputs), `prelude` runs after the code.
    """

    kind: str
    inputs: tuple
    outputs: tuple = ()
    fn_name: str | None = None
    prelude: str = ""

    def __len__(self) -> int:
        return len(self.inputs)


def _lines_text(value: Any, what: str) -> str:
    """A stdin/stdout value: a string, or a list of lines joined with newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return "\n".join(value)
    raise ValueError(f"{what} must be a string or a list of strings, got {type(value).__name__}")


def _call_args(value: Any, what: str) -> list:
    """Positional arguments of a call-based test: JSON-per-line string, or a list of arguments."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        try:
            return [json.loads(line) for line in value.split("\n") if line.strip()]
        except ValueError as exc:
            raise ValueError(f"{what} is not one JSON value per line: {exc}") from None
    raise ValueError(f"{what} must be a JSON-lines string or a list of arguments, got {type(value).__name__}")


def parse_tests(tests: str | dict) -> Tests:
    """Validate ground truth (JSON text or dict, formats in the module doc); ValueError says what is wrong."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError as exc:
            raise ValueError(f"code ground truth is not valid JSON: {exc}") from None
    if not isinstance(tests, dict):
        raise ValueError(f"code ground truth must be a JSON object, got {type(tests).__name__}")
    apps, asserts = "inputs" in tests or "outputs" in tests, "asserts" in tests or "prelude" in tests
    if apps == asserts:
        raise ValueError(
            "code ground truth needs either 'inputs'+'outputs' (APPS/TACO) or 'asserts' (+'prelude'), "
            f"got keys {sorted(tests)}"
        )
    if asserts:
        statements, prelude = tests.get("asserts"), tests.get("prelude", "")
        if not isinstance(statements, list) or not statements or not all(isinstance(a, str) for a in statements):
            raise ValueError("'asserts' must be a non-empty list of strings")
        if not isinstance(prelude, str):
            raise ValueError(f"'prelude' must be a string, got {type(prelude).__name__}")
        for i, statement in enumerate(statements):
            _check_syntax(statement, f"asserts[{i}]")
        _check_syntax(prelude, "prelude")
        return Tests("assert", tuple(statements), prelude=prelude)
    inputs, outputs, fn_name = tests.get("inputs"), tests.get("outputs"), tests.get("fn_name")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise ValueError("'inputs' and 'outputs' must both be lists")
    if not inputs or len(inputs) != len(outputs):
        raise ValueError(
            f"'inputs' and 'outputs' must be non-empty and equally long, got {len(inputs)} and {len(outputs)}"
        )
    if fn_name is None:
        ins = tuple(_lines_text(v, f"inputs[{i}]") for i, v in enumerate(inputs))
        outs = tuple(_lines_text(v, f"outputs[{i}]") for i, v in enumerate(outputs))
        return Tests("stdio", ins, outs)
    if not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise ValueError(f"'fn_name' must be a Python identifier, got {fn_name!r}")
    args = tuple(_call_args(v, f"inputs[{i}]") for i, v in enumerate(inputs))
    return Tests("call", args, tuple(outputs), fn_name=fn_name)


def _check_syntax(source: str, what: str) -> None:
    try:
        compile(source, f"<{what}>", "exec")
    except SyntaxError as exc:
        raise ValueError(f"{what} is not valid Python: {exc}") from None


def extract_code(response: str) -> str:
    """The code after the last ```python fence up to the next ``` (the whole response if no fence)."""
    start = response.rfind(_FENCE_OPEN)
    if start < 0:
        return response
    body = response[start + len(_FENCE_OPEN) :]
    end = body.find(_FENCE_CLOSE)
    return body if end < 0 else body[:end]


def _is_close(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= _ATOL + _RTOL * abs(b)


def _as_float(token: str) -> float | None:
    try:
        value = float(token)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def stdout_matches(output: str, expected: str) -> bool:
    """Lenient stdout comparison: stripped text, stripped non-empty lines, tokens, tokens as floats."""
    if output.strip() == expected.strip():
        return True

    def lines(text: str) -> list[str]:
        return [line.strip() for line in text.strip().splitlines() if line.strip()]

    if lines(output) == lines(expected):
        return True
    got, want = output.split(), expected.split()
    if got == want:
        return True
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if g == w:
            continue
        gf, wf = _as_float(g), _as_float(w)
        if gf is None or wf is None or not _is_close(gf, wf):
            return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _values_match(got: Any, want: Any) -> bool:
    """Equality of JSON values, with floats compared by allclose tolerances."""
    if _is_number(got) and _is_number(want) and (isinstance(got, float) or isinstance(want, float)):
        try:
            return _is_close(float(got), float(want))
        except OverflowError:
            return False
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_values_match(g, w) for g, w in zip(got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_values_match(got[k], want[k]) for k in got)
    return got == want


def return_value_matches(output_json: str, expected: Any) -> bool:
    """Call-based comparison: the returned value equals `expected`, or its single element when
    `expected` is a one-element-wrapped list (APPS convention), or `expected` decoded from a JSON string."""
    try:
        got = json.loads(output_json)
    except ValueError:
        return False
    candidates = [expected]
    if isinstance(expected, list) and expected:
        candidates.append(expected[0])
    if isinstance(expected, str):
        try:
            candidates.append(json.loads(expected))
        except ValueError:
            pass
    return any(_values_match(got, want) for want in candidates)


def _passed(tests: Tests, index: int, result: TestResult) -> bool:
    if tests.kind == "assert":
        return result.status == "pass"
    if result.status != "output":
        return False
    if tests.kind == "stdio":
        return stdout_matches(result.output, tests.outputs[index])
    return return_value_matches(result.output, tests.outputs[index])


def score(response: str, tests: str | dict | Tests, limits: Limits = Limits(), *,
          allow_unsandboxed: bool = False, reuse_sandbox: bool = True) -> float:
    """Fraction in [0, 1] of the first min(#tests, 10) tests the response's code passes (module doc).

    Raises ValueError on malformed ground truth, `SandboxUnavailable` without a working bubblewrap
    unless `allow_unsandboxed` (this and `reuse_sandbox`: see `sandbox.run_tests`).
    """
    parsed = tests if isinstance(tests, Tests) else parse_tests(tests)
    code = extract_code(response)
    if not code.strip():
        return 0.0
    count = min(len(parsed), MAX_SCORED_TESTS)
    program = Program(
        mode=parsed.kind,
        source=code,
        tests=parsed.inputs[:count],
        header=HEADER,
        prelude=parsed.prelude,
        fn_name=parsed.fn_name,
    )
    results = run_tests(program, limits, allow_unsandboxed=allow_unsandboxed, reuse_sandbox=reuse_sandbox)
    return sum(_passed(parsed, i, r) for i, r in enumerate(results)) / count
