"""Step labels of a response to a synthetic chain (`prime_jax.data.synthetic.task_chain`).

A response is read the way `reference_solution` writes one: one step per line, then the answer.
- Math (`ChainStep`s): step lines are the non-blank lines before the first line holding `\\boxed` (the answer line,
  and anything after it, is the outcome verifier's business, not a step); a step reads `a op b = c` over integers
  (op one of + - *, spaces optional, a leading minus allowed on each number).
- Code (`CodeStep`s): step lines are the non-blank lines after the first `def` line, up to the first line that
  starts with `return` or closes the fence; a step reads `x = x op n`.
A line's span is its text without the surrounding whitespace.
- malformed: a step line not in its step form. It is no attempt at the chain's next operation, so it does not take
  a chain position.
- right: the j-th well-formed step (j counts well-formed steps only) equals the chain's j-th step exactly: for math
  its operands are the chain's previous value and the next operator and operand, and its result is correct; for code
  its operator and operand are the chain's next ones.
- wrong: any other well-formed step: wrong arithmetic, an operand or operator not the chain's next one (a wrong
  value copied, a step skipped or repeated), or a step past the chain's end. After a first error, steps are still
  judged against the true chain, so carrying a wrong value on is wrong and a step that returns to the chain is right.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from prime_jax.data.synthetic import ChainStep, CodeStep

Label = Literal["right", "wrong", "malformed"]
LABELS: tuple[Label, ...] = ("right", "wrong", "malformed")
_MATH_STEP = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)")
_CODE_STEP = re.compile(r"x\s*=\s*x\s*([-+*])\s*(-?\d+)")
_ANSWER = "\\boxed"


@dataclasses.dataclass(frozen=True)
class StepLabels:
    """labels: one per step line, in order; spans: [S, 2] int64 character [start, end) of each step line in the
    response text; first_wrong: index (into labels) of the first "wrong" step, None if there is none."""

    labels: tuple[Label, ...]
    spans: np.ndarray
    first_wrong: int | None

    def count(self, label: Label) -> int:
        """How many step lines carry `label`."""
        return self.labels.count(label)


def _is_code_boundary(line: str) -> bool:
    return line.startswith("return") or line.startswith("```")


def step_lines(text: str, *, code: bool = False) -> list[tuple[int, int]]:
    """Character spans [start, end) of the step lines of `text` (module docstring), in order; `code`: the code form."""
    spans, start, inside = [], 0, not code
    for line in text.split("\n"):
        stripped = line.strip()
        if (code and inside and _is_code_boundary(stripped)) or (not code and _ANSWER in line):
            break
        if inside and stripped:
            first = start + line.index(stripped)
            spans.append((first, first + len(stripped)))
        inside = inside or stripped.startswith("def ")
        start += len(line) + 1
    return spans


def _parse(line: str, code: bool) -> ChainStep | CodeStep | None:
    match = (_CODE_STEP if code else _MATH_STEP).fullmatch(line)
    if match is None:
        return None
    if code:
        return CodeStep(match.group(1), int(match.group(2)))
    a, op, b, c = match.groups()
    return ChainStep(int(a), op, int(b), int(c))


def label_steps(chain: Sequence[ChainStep] | Sequence[CodeStep], text: str) -> StepLabels:
    """Labels the step lines of response `text` against the task's `chain` (module docstring)."""
    code = isinstance(chain[0], CodeStep)
    spans = step_lines(text, code=code)
    labels: list[Label] = []
    for start, end in spans:
        step = _parse(text[start:end], code)
        if step is None:
            labels.append("malformed")
            continue
        j = len(labels) - labels.count("malformed")
        labels.append("right" if j < len(chain) and step == chain[j] else "wrong")
    first_wrong = labels.index("wrong") if "wrong" in labels else None
    return StepLabels(tuple(labels), np.array(spans, np.int64).reshape(-1, 2), first_wrong)
