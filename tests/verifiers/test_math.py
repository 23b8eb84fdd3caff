"""Math verifier: hand-written answer table, answer extraction, and the benchmark answer files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prime_jax.verifiers import math as math_verifier
from prime_jax.verifiers.pool import VerifierPool, VerifyItem

BENCH = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "benchmarks"

# (response, ground truth, expected score). Written for this project; every "0" row is a wrong
# answer that looks close to the right one.
CASES = [
    # integers, decimals, fractions
    ("So the total is \\boxed{4}.", "4", 1.0),
    ("\\boxed{5}", "4", 0.0),
    ("\\boxed{-4}", "4", 0.0),
    ("The answer is \\boxed{\\frac{1}{2}}.", "\\frac12", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{3/4}", "\\frac34", 1.0),
    ("\\boxed{0.75}", "\\frac{3}{4}", 1.0),
    ("\\boxed{0.7}", "\\frac{3}{4}", 0.0),
    ("\\boxed{\\frac{4}{3}}", "\\frac{3}{4}", 0.0),
    ("\\boxed{-\\frac{3}{4}}", "\\frac{3}{4}", 0.0),
    ("\\boxed{3.0}", "3", 1.0),
    ("\\boxed{3.01}", "3", 0.0),
    ("\\boxed{142}", "142.0", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1001}", "1000", 0.0),
    ("\\boxed{\\$32}", "32", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    # percentages
    ("\\boxed{50\\%}", "50\\%", 1.0),
    ("\\boxed{0.5}", "50\\%", 1.0),
    ("\\boxed{5\\%}", "50\\%", 0.0),
    ("\\boxed{25\\%}", "25", 1.0),
    ("\\boxed{-4\\%}", "-4", 1.0),      # signed percentages: the same rule as 25\% for 25
    ("\\boxed{-4}", "-4\\%", 1.0),
    ("\\boxed{-4\\%}", "-0.04", 1.0),
    ("\\boxed{-0.04}", "-4\\%", 1.0),
    ("\\boxed{-4\\%}", "4", 0.0),
    ("\\boxed{4\\%}", "-4", 0.0),
    ("\\boxed{-4\\%}", "-5", 0.0),
    ("\\boxed{-2.5\\%}", "-2.5\\%", 1.0),
    # scientific notation (Minerva style)
    ("\\boxed{4.5\\times 10^{33}}", "4.5e33", 1.0),
    ("\\boxed{4.6\\times 10^{33}}", "4.5e33", 0.0),
    ("\\boxed{2.88 \\times 10^{-19}}", "2.88e-19", 1.0),
    ("\\boxed{1.325\\times 10^{-27}}", "2.88e-19", 0.0),
    # intervals
    ("\\boxed{(1, 2]}", "(1,2]", 1.0),
    ("\\boxed{[1, 2]}", "(1,2]", 0.0),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", 1.0),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3)", 0.0),
    ("\\boxed{[-2, 7]}", "[-2,7]", 1.0),
    ("\\boxed{[-2, 6]}", "[-2,7]", 0.0),
    # sets and tuples
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2, 3\\}", 0.0),
    ("\\boxed{(3, 4)}", "(3,4)", 1.0),
    ("\\boxed{(4, 3)}", "(3,4)", 0.0),
    ("\\boxed{(1, 2, 3)}", "(1,2,3)", 1.0),
    ("\\boxed{(1, 3, 2)}", "(1,2,3)", 0.0),
    # radicals, pi, complex numbers, matrices
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt2}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{3}}", "\\frac{\\sqrt{3}}{2}", 0.0),
    ("\\boxed{\\frac{\\pi}{2}}", "\\frac{\\pi}2", 1.0),
    ("\\boxed{2\\pi}", "\\pi", 0.0),
    ("\\boxed{6-5i}", "6 - 5i", 1.0),
    ("\\boxed{6+5i}", "6-5i", 0.0),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 1.0),
    ("\\boxed{\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", 0.0),
    # symbolic equivalence
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("\\boxed{x^2+2x-1}", "x^2+2x+1", 0.0),
    ("\\boxed{2x+2}", "2(x+1)", 1.0),
    ("\\boxed{2x+1}", "2(x+1)", 0.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{5}", "x=5", 1.0),
    ("\\boxed{x = 6}", "5", 0.0),
    # text answers
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", 1.0),
    ("\\boxed{C}", "\\text{(C)}", 1.0),
    ("\\boxed{D}", "\\text{(C)}", 0.0),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}", 1.0),
    ("\\boxed{\\text{Tuesday}}", "\\text{Monday}", 0.0),
    # which box counts
    ("\\fbox{7}", "7", 1.0),
    ("First guess \\boxed{3}; after checking, \\boxed{10}.", "10", 1.0),
    ("First guess \\boxed{10}; after checking, \\boxed{3}.", "10", 0.0),
    ("\\boxed{5} but then the last box is cut off: \\boxed{\\frac{1", "5", 0.0),
    # answers outside a box
    ("The answer is 42.", "42", 1.0),
    ("The answer is 41.", "42", 0.0),
    ("Final answer: 42", "42", 1.0),
    ("So the answer is $\\frac{1}{2}$.", "\\frac12", 1.0),
    ("The answer is \\(\\sqrt{2}\\).", "\\sqrt{2}", 1.0),
    ("Therefore x = 7", "7", 1.0),
    ("Therefore x = 8", "7", 0.0),
    ("42 is the answer.", "42", 1.0),
    ("41 is the answer.", "42", 0.0),
    ("I could not solve this problem", "42", 0.0),
    ("", "42", 0.0),
]


def test_table_has_enough_cases() -> None:
    assert len(CASES) >= 60
    assert sum(expected == 0.0 for *_, expected in CASES) >= 25


@pytest.mark.parametrize(("response", "truth", "expected"), CASES)
def test_score_table(response: str, truth: str, expected: float) -> None:
    assert math_verifier.score(response, truth) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("a \\boxed{\\frac{a}{b}} b", "\\frac{a}{b}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("x \\boxed 5 and more", "5"),
        ("$\\boxed{x^{2}}$.", "x^{2}"),
        ("\\boxed{1} \\fbox{2}", "2"),
        ("\\boxed{}", None),
        ("answer is 12. ", "12"),
        ("The answer is: $3$", "3"),
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert math_verifier.extract_answer(response) == expected


def test_pathological_answer_is_bounded() -> None:
    """A power tower sympy cannot settle quickly is cut off by the timeout and scored 0."""
    import time

    start = time.monotonic()
    assert math_verifier.score("\\boxed{9^{9^{9}}}", "5") == 0.0
    assert time.monotonic() - start < 15


def _benchmark_answers() -> list[tuple[str, str]]:
    """(source, reference answer) of every row of the five math benchmark files."""
    rows: list[tuple[str, str]] = []
    math500 = json.loads((BENCH / "math500.json").read_text())
    rows += [("math500", a) for a in math500["expected_answer"].values()]
    for line in (BENCH / "aime_2022_2024.jsonl").read_text().splitlines():
        rows.append(("aime", json.loads(line)["answer"]))
    for line in (BENCH / "amc_2022_2023.jsonl").read_text().splitlines():
        answer = json.loads(line)["answer"]
        rows.append(("amc", str(int(answer)) if float(answer).is_integer() else str(answer)))
    for line in (BENCH / "minerva_math.jsonl").read_text().splitlines():
        boxed = math_verifier.extract_answer(json.loads(line)["solution"])
        assert boxed is not None
        rows.append(("minerva", boxed))
    for line in (BENCH / "olympiadbench.jsonl").read_text().splitlines():
        rows.append(("olympiadbench", json.loads(line)["final_answer"][0]))
    return rows


def test_benchmark_reference_answers() -> None:
    """Each benchmark answer, boxed, scores 1 against itself and 0 against another problem's
    (different) answer, for >= 99% of rows."""
    rows = _benchmark_answers()
    assert len(rows) == 500 + 90 + 83 + 272 + 675

    def key(answer: str) -> str:
        return "".join(answer.replace("$", "").split())

    items, pairs = [], []
    for i, (source, answer) in enumerate(rows):
        j = (i + 1) % len(rows)
        while key(rows[j][1]) == key(answer):
            j = (j + 1) % len(rows)
        other = rows[j][1]
        pairs.append((source, answer, other))
        items.append(VerifyItem(f"Therefore the answer is $\\boxed{{{answer}}}$.", "math", answer))
        items.append(VerifyItem(f"Therefore the answer is $\\boxed{{{other}}}$.", "math", answer))
    with VerifierPool(num_workers=2, item_timeout_s=60, batch_timeout_s=600) as pool:
        result = pool.score_batch(items)
    same, different = result.scores[0::2], result.scores[1::2]
    misses = [(p, float(s), float(d)) for p, s, d in zip(pairs, same, different) if s != 1.0 or d != 0.0]
    rate = 1 - len(misses) / len(rows)
    print(f"\nmath benchmark answers: {len(rows) - len(misses)}/{len(rows)} rows as expected ({rate:.2%})")
    for (source, answer, other), s, d in misses:
        print(f"  miss [{source}] answer={answer!r} self={s} vs other={other!r} -> {d}")
    assert result.counts["timeouts"] == result.counts["crashes"] == result.counts["errors"] == 0
    assert rate >= 0.99


@pytest.mark.parametrize("response, truth, reference, literal", [
    ("\\boxed{7 + 3}", "10", 1.0, 0.0),        # an unevaluated expression: accepted by the reference grader
    ("\\boxed{2^{10}}", "1024", 1.0, 0.0),
    ("\\boxed{10}", "10", 1.0, 1.0),
    ("\\boxed{1,000}", "1000", 1.0, 1.0),
    ("\\boxed{+10}", "10", 1.0, 1.0),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", 1.0, 1.0),  # non-number truths are unaffected
    ("\\boxed{11}", "10", 0.0, 0.0),
])
def test_literal_numbers_rejects_expressions_for_number_truths(response, truth, reference, literal):
    assert math_verifier.score(response, truth) == reference
    assert math_verifier.score(response, truth, literal_numbers=True) == literal
