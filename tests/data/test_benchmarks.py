"""Benchmark loaders on the real files: row counts, hand-checked answers, code tests that really run."""

import dataclasses
import functools
import json
import subprocess
import sys

import pytest

from prime_jax.data.benchmarks import (
    BENCHMARK_FILES,
    MAX_NEW_TOKENS,
    TABLE1,
    format_number,
    join_final_answers,
    last_boxed,
    load_benchmark,
    split_assert_script,
)
from prime_jax.data.prompts import CODE_SUFFIX, MATH_SUFFIX, SYSTEM_PROMPT

ROOT = "../shared/data/benchmarks"
ROWS = {
    "math500": 500, "aime24": 30, "aime": 90, "amc": 83, "minerva": 272,
    "olympiadbench": 675, "humaneval": 164, "mbpp": 399, "leetcode": 180,
}  # fmt: skip (lcb_v2 is not in the shared folder: tests/data/test_livecodebench.py writes its own release files)


@functools.cache
def _load(name):
    return load_benchmark(name, ROOT)


def _raw(file_name):
    import gzip

    opener = gzip.open if file_name.endswith(".gz") else open
    with opener(f"{ROOT}/{file_name}", "rt") as f:
        return [json.loads(line) for line in f] if ".jsonl" in file_name else json.load(f)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_rows_and_prompts(name):
    examples = _load(name)
    assert len(examples) == ROWS[name]
    assert len({e.uid for e in examples}) == len(examples)
    ability = BENCHMARK_FILES[name][1]
    for e in examples:
        assert e.ability == ability and e.data_source == name and e.ground_truth
        assert e.prompt[0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert e.question().endswith(MATH_SUFFIX if ability == "math" else CODE_SUFFIX)


def test_math_answers_hand_checked():
    math500 = _load("math500")
    assert math500[0].question().startswith("If $2^8=4^x$") and math500[0].ground_truth == "4"
    assert _load("aime")[0].ground_truth == "116"
    aime = {e.uid: e for e in _load("aime")}
    assert all(aime[e.uid.replace("aime24/", "aime/")] == dataclasses.replace(e, uid=e.uid.replace("aime24/", "aime/"),
                                                                            data_source="aime") for e in _load("aime24"))
    assert [e.uid for e in _load("aime24")][:1] == ["aime24/60"]  # AIME 2024 I, problem 1: the 61st row
    amc = _load("amc")
    assert [e.ground_truth for e in amc[:3]] == ["142", "144", "81"]  # 142.0, 144.0, 81.0 in the file
    assert [e.ground_truth for e in _load("minerva")[:2]] == ["1.6", "4.5e33"]
    olympiad = {e.uid: e.ground_truth for e in _load("olympiadbench")}
    assert olympiad["olympiadbench/1606"] == "2"
    assert "69,84" in olympiad.values() and "f(n)=n, g(n)=1" in olympiad.values()


def test_code_questions_hand_checked():
    he = _load("humaneval")[0].question()
    assert he.startswith(
        "Write Python code to solve the task.\nWrite a Python function "
        "`has_close_elements(numbers: List[float], threshold: float) -> bool` to solve the following "
        "problem: Present code in ```python```\n```python\nfrom typing import List\n"
    )
    assert _raw("humaneval.jsonl.gz")[0]["prompt"] in he
    assert _load("mbpp")[0].question() == (
        "Write Python code to solve the task.\nWrite a Python function `similar_elements(test_tup1, test_tup2)` "
        "to solve the following problem: Present code in ```python and ```\n"
        "Write a function to find the shared elements from the given two lists.\n"
        "The code should pass the following test cases:>>> "
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n\n Let's coding step by step.\n"
        + CODE_SUFFIX
    )


def test_answer_helpers():
    assert last_boxed(r"so \boxed{1} then \boxed{\frac{1}{2}} and more") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{x^{2}") is None and last_boxed("none") is None
    assert format_number(142.0) == "142" and format_number(0.5) == "0.5" and format_number(-4.0) == "-4"
    assert join_final_answers(["$1$", "$\\frac{1}{2}$"]) == "1, \\frac{1}{2}"
    assert join_final_answers(["costs \\$5"]) == "costs \\$5"


RUNNER = """
import json, sys
results = []
for code, prelude, asserts in json.load(sys.stdin):
    ns = {}
    try:
        exec(code, ns)
        exec(prelude, ns)
        for a in asserts:
            exec(a, ns)
        results.append(True)
    except BaseException:
        results.append(False)
print(json.dumps(results))
"""


def _run(programs):
    out = subprocess.run(
        [sys.executable, "-c", RUNNER], input=json.dumps(programs), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _programs(name, solutions):
    progs = []
    for e, code in zip(_load(name), solutions):
        truth = json.loads(e.ground_truth)
        progs.append((code, truth["prelude"], truth["asserts"]))
    return progs


def test_humaneval_and_mbpp_reference_solutions_pass_and_broken_ones_fail():
    he = _raw("humaneval.jsonl.gz")
    mbpp = _raw("mbpp.json")
    good = _programs("humaneval", [r["prompt"] + r["canonical_solution"] for r in he])
    good += _programs("mbpp", [r["code"] for r in mbpp])
    bad = _programs("humaneval", [r["prompt"] + "    return None\n" for r in he])
    bad += _programs("mbpp", [r["code"].replace("return ", "return None and ") for r in mbpp])
    passed = _run(good + bad)
    assert all(passed[: len(good)])
    broken_fail = 1 - sum(passed[len(good) :]) / len(bad)
    assert broken_fail >= 0.95, broken_fail


@pytest.fixture(scope="module")
def leetcode():
    return _load("leetcode")


def _code_lines(text):
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_leetcode_split_preserves_the_script(leetcode):
    for row, e in zip(_raw("leetcode.jsonl"), leetcode):
        truth = json.loads(e.ground_truth)
        asserts = truth["asserts"]
        # Same statements in the same order, none lost or duplicated; one assert per test.
        assert _code_lines("\n".join([truth["prelude"], *asserts])) == _code_lines(row["test"])
        assert len(asserts) == sum(line.startswith("assert ") for line in row["test"].splitlines())
        assert all(sum(line.startswith("assert ") for line in a.splitlines()) == 1 for a in asserts)
        assert truth["prelude"].startswith("my_solution = Solution()")
        assert "test_input" not in truth["prelude"]
        assert e.question().startswith(row["prompt_sft"])


def test_leetcode_asserts_run_against_a_hand_written_solution(leetcode):
    right = (
        "class Solution:\n"
        "    def minimumPushes(self, word: str) -> int:\n"
        "        return sum(i // 8 + 1 for i in range(len(word)))\n"
    )
    wrong = right.replace("i // 8 + 1", "1")
    truth = json.loads(leetcode[0].ground_truth)
    assert "minimumPushes" in truth["asserts"][0]
    assert _run([(right, truth["prelude"], truth["asserts"]), (wrong, truth["prelude"], truth["asserts"])]) == [
        True,
        False,
    ]


def test_split_assert_script_by_hand():
    script = "s = S()\nh = lambda v: v\n\nx = 1\nassert s.f(x) == 2\n\nx = 5\ny = 2\nassert s.g(x, y) == 3\n"
    assert split_assert_script(script) == (
        "s = S()\nh = lambda v: v",
        ["x = 1\nassert s.f(x) == 2", "x = 5\ny = 2\nassert s.g(x, y) == 3"],
    )
    with pytest.raises(ValueError, match="no assert"):
        split_assert_script("x = 1\n")


def test_every_benchmark_has_a_token_limit_and_table1_names_benchmarks():
    assert set(MAX_NEW_TOKENS) == set(BENCHMARK_FILES)
    assert MAX_NEW_TOKENS["math500"] == MAX_NEW_TOKENS["leetcode"] == 8192 and MAX_NEW_TOKENS["aime24"] == 4096
    assert [h for h, _ in TABLE1] == ["AIME24", "AMC", "MATH-500", "Minerva", "OlympiadBench", "LeetCode", "LCB v2"]
    assert all(name in BENCHMARK_FILES for _, name in TABLE1)


def test_unknown_benchmark():
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("gsm8k", ROOT)
    with pytest.raises(FileNotFoundError):
        load_benchmark("aime", "/nonexistent")


def test_code_truths_parse_with_the_code_verifier():
    from prime_jax.verifiers.code import parse_tests

    for name in ("humaneval", "mbpp", "leetcode"):
        for e in _load(name):
            parsed = parse_tests(e.ground_truth)
            assert parsed.kind == "assert" and len(parsed) == len(json.loads(e.ground_truth)["asserts"])
