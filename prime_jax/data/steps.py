"""Step labels of a response to a synthetic math chain (`prime_jax.data.synthetic.math_chain`).

A response is read the way `reference_solution` writes one: one step per line, `a op b = c`, then `\\boxed{N}`.
- Step lines: the non-blank lines before the first line holding `\\boxed` (the answer line, and anything after it,
  is the outcome verifier's business, not a step). A line's span is its text without the surrounding whitespace.
- malformed: a step line that is not `a op b = c` over integers (op one of + - *, spaces optional, a leading minus
  allowed on each number). It is no attempt at the chain's next operation, so it does not take a chain position.
- right: the j-th well-formed step (j counts well-formed steps only) equals the chain's j-th step exactly: its
  operands are the chain's previous value and the next operator and operand, and its result is correct.
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

from prime_jax.data.synthetic import ChainStep

Label = Literal["right", "wrong", "malformed"]
LABELS: tuple[Label, ...] = ("right", "wrong", "malformed")
_STEP = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)")
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


def step_lines(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the step lines of `text` (module docstring), in order."""
    spans, start = [], 0
    for line in text.split("\n"):
        if _ANSWER in line:
            break
        stripped = line.strip()
        if stripped:
            first = start + line.index(stripped)
            spans.append((first, first + len(stripped)))
        start += len(line) + 1
    return spans


def label_steps(chain: Sequence[ChainStep], text: str) -> StepLabels:
    """Labels the step lines of response `text` against the task's `chain` (module docstring)."""
    spans = step_lines(text)
    labels: list[Label] = []
    for start, end in spans:
        match = _STEP.fullmatch(text[start:end])
        if match is None:
            labels.append("malformed")
            continue
        a, op, b, c = match.groups()
        j = len(labels) - labels.count("malformed")
        labels.append("right" if j < len(chain) and (int(a), op, int(b), int(c)) == tuple(chain[j]) else "wrong")
    first_wrong = labels.index("wrong") if "wrong" in labels else None
    return StepLabels(tuple(labels), np.array(spans, np.int64).reshape(-1, 2), first_wrong)
