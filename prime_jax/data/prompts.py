"""PRIME prompt templates: the short action-centric system prompt and the math / code task suffixes.

Text as in the Eurus-2-RL-Data `prompt` column and PRIME's `eval/` scripts (docs/prime_spec.md §4.1-4.2).
"""

from __future__ import annotations

from prime_jax.data.example import ABILITIES

_ACTIONS = ("ASSESS", "ADVANCE", "VERIFY", "SIMPLIFY", "SYNTHESIZE", "PIVOT", "OUTPUT")
_FORMAT = (
    "[ACTION NAME]",
    "# Your action step 1",
    "# Your action step 2",
    "# Your action step 3",
    "...",
    "Next action: [NEXT ACTION NAME]",
)

# Leading newline, blocks separated by blank lines, trailing blank line.
SYSTEM_PROMPT = (
    "\nWhen tackling complex reasoning tasks, you have access to the following actions. "
    "Use them as needed to progress through your thought process.\n\n"
    + "".join(f"[{a}]\n\n" for a in _ACTIONS)
    + "You should strictly follow the format below:\n\n"
    + "".join(f"{line}\n\n" for line in _FORMAT)
)

MATH_SUFFIX = "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"
CODE_SUFFIX = (
    "\n\nWrite Python code to solve the problem. Present the code in \n```python\nYour code\n```\n"
    "at the end."
)
SUFFIXES = {"math": MATH_SUFFIX, "code": CODE_SUFFIX}


def build_messages(
    question: str, ability: str, *, system_prompt: str | None = SYSTEM_PROMPT
) -> list[dict]:
    """Chat messages for a question: [system (if any), user = question + the ability's suffix]."""
    if ability not in ABILITIES:
        raise ValueError(f"ability must be one of {ABILITIES}, got {ability!r}")
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": question + SUFFIXES[ability]})
    return messages
