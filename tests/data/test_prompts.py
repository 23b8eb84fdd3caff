"""PRIME prompt templates against the text of the Eurus-2-RL-Data prompt column, written out by hand."""

import pytest

from prime_jax.data.prompts import CODE_SUFFIX, MATH_SUFFIX, SYSTEM_PROMPT, build_messages

# As it appears in the dataset card's example rows.
EXPECTED_SYSTEM = (
    "\nWhen tackling complex reasoning tasks, you have access to the following actions. Use them as "
    "needed to progress through your thought process.\n\n[ASSESS]\n\n[ADVANCE]\n\n[VERIFY]\n\n"
    "[SIMPLIFY]\n\n[SYNTHESIZE]\n\n[PIVOT]\n\n[OUTPUT]\n\nYou should strictly follow the format "
    "below:\n\n[ACTION NAME]\n\n# Your action step 1\n\n# Your action step 2\n\n# Your action step 3"
    "\n\n...\n\nNext action: [NEXT ACTION NAME]\n\n"
)


def test_system_prompt_text():
    assert SYSTEM_PROMPT == EXPECTED_SYSTEM


def test_suffixes():
    assert MATH_SUFFIX == "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"
    assert CODE_SUFFIX == (
        "\n\nWrite Python code to solve the problem. Present the code in \n```python\nYour code\n```\nat the end."
    )


def test_build_messages():
    assert build_messages("What is 1+1?", "math") == [
        {"role": "system", "content": EXPECTED_SYSTEM},
        {"role": "user", "content": "What is 1+1?" + MATH_SUFFIX},
    ]
    assert build_messages("Sort a list.", "code", system_prompt=None) == [
        {"role": "user", "content": "Sort a list." + CODE_SUFFIX}
    ]
    with pytest.raises(ValueError, match="ability"):
        build_messages("x", "chemistry")
