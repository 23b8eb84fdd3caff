"""LiveCodeBench loader on release-format files written here: stdin and functional problems, private tests
compressed as the release ships them, contest dates inside and outside the v2 window; the code verifier
scores a correct solution 1.0 and a wrong one lower."""

import base64
import json
import pickle
import zlib

import pytest

from prime_jax.data.benchmarks import load_benchmark
from prime_jax.data.livecodebench import decode_private_tests, encode_private_tests, release_files
from prime_jax.data.prompts import CODE_SUFFIX
from prime_jax.verifiers import code


def _tests(pairs, kind):
    return [{"input": i, "output": o, "testtype": kind} for i, o in pairs]


def _row(qid, date, content, public, private, *, starter="", func_name=None, compress=True):
    return {
        "question_title": qid, "question_content": content, "platform": "leetcode" if func_name else "atcoder",
        "question_id": qid, "contest_id": "c1", "contest_date": date, "starter_code": starter, "difficulty": "easy",
        "public_test_cases": json.dumps(public),
        "private_test_cases": encode_private_tests(private) if compress else json.dumps(private),
        "metadata": json.dumps({"func_name": func_name} if func_name else {}),
    }


SUM_STDIN = _row("abc301_a", "2023-06-17T00:00:00", "Print the sum of N integers.",
                 _tests([("3\n1 2 3\n", "6\n")], "stdin"),
                 _tests([("1\n5\n", "5\n"), ("2\n-1 1\n", "0\n"), ("4\n10 20 30 40\n", "100\n")], "stdin"))
TWO_SUM = _row("2999", "2024-05-31T00:00:00", "Return indices of the two numbers adding up to target.",
               _tests([("[2,7,11,15]\n9", "[0, 1]")], "functional"),
               _tests([("[3,2,4]\n6", "[1, 2]"), ("[3,3]\n6", "[0, 1]")], "functional"),
               starter="class Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n        ",
               func_name="twoSum")
BEFORE = _row("old", "2023-04-30T00:00:00", "Too early.", _tests([("1\n", "1\n")], "stdin"), _tests([("2\n", "2\n")], "stdin"))
AFTER = _row("new", "2024-06-01T00:00:00", "Too late.", _tests([("1\n", "1\n")], "stdin"), _tests([("2\n", "2\n")], "stdin"))
LATE_ON_LAST_DAY = _row("late", "2024-05-31T12:00:00", "After midnight of the last day (lcb_runner drops it).",
                        _tests([("1\n", "1\n")], "stdin"), _tests([("2\n", "2\n")], "stdin"), compress=False)

STDIN_RIGHT = "```python\nn = int(input())\nprint(sum(map(int, input().split())))\n```"
STDIN_WRONG = "```python\nn = int(input())\nprint(max(map(int, input().split())))\n```"
FUNC_RIGHT = ("```python\nclass Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
              "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
              "                return [seen[target - x], i]\n            seen[x] = i\n```")
FUNC_WRONG = "```python\nclass Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]\n```"


@pytest.fixture
def release(tmp_path):
    """A release folder as code_generation_lite ships it: test.jsonl, then test2.jsonl with later problems."""
    root = tmp_path / "livecodebench"
    root.mkdir()
    for name, rows in (("test.jsonl", [BEFORE, SUM_STDIN]), ("test2.jsonl", [TWO_SUM, AFTER, LATE_ON_LAST_DAY])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "README.md").write_text("not a release file")
    return tmp_path


def test_private_tests_decode_as_lcb_runner_decodes_them():
    tests = _tests([("1\n", "2\n")], "stdin")
    encoded = encode_private_tests(tests)
    # lcb_runner: json.loads(pickle.loads(zlib.decompress(base64.b64decode(s.encode("utf-8")))))
    assert json.loads(pickle.loads(zlib.decompress(base64.b64decode(encoded.encode("utf-8"))))) == tests
    assert decode_private_tests(encoded) == tests == decode_private_tests(json.dumps(tests))
    evil = base64.b64encode(zlib.compress(pickle.dumps({"a": 1}))).decode()
    with pytest.raises(ValueError, match="not the JSON text"):
        decode_private_tests(evil)


def test_release_files_in_release_order(release):
    files = release_files(str(release / "livecodebench"))
    assert [f.rsplit("/", 1)[1] for f in files] == ["test.jsonl", "test2.jsonl"]


def test_v2_window_questions_and_tests(release):
    examples = load_benchmark("lcb_v2", release)
    assert [e.uid for e in examples] == ["lcb_v2/abc301_a", "lcb_v2/2999"]  # 2023-05-01 <= date <= 2024-05-31 00:00
    stdin, func = examples
    assert stdin.ability == func.ability == "code" and stdin.data_source == "lcb_v2"
    assert stdin.question() == (
        "### Question:\nPrint the sum of N integers.\n\n### Format: Read the inputs from stdin solve the problem and "
        "write the answer to stdout (do not directly test on the sample inputs). Enclose your code within delimiters "
        "as follows.\n```python\n# YOUR CODE HERE\n```\n\n### Answer: (use the provided format with backticks)\n\n"
        + CODE_SUFFIX)
    assert "```python\nclass Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:" in func.question()
    assert json.loads(stdin.ground_truth) == {"inputs": ["3\n1 2 3\n", "1\n5\n", "2\n-1 1\n", "4\n10 20 30 40\n"],
                                              "outputs": ["6\n", "5\n", "0\n", "100\n"]}  # public first, then private
    assert json.loads(func.ground_truth) == {"inputs": ["[2,7,11,15]\n9", "[3,2,4]\n6", "[3,3]\n6"],
                                             "outputs": [[0, 1], [1, 2], [0, 1]], "fn_name": "twoSum"}


def test_code_verifier_scores_right_and_wrong_solutions(release):
    stdin, func = load_benchmark("lcb_v2", release)
    assert code.score(STDIN_RIGHT, stdin.ground_truth) == 1.0
    assert code.score(STDIN_WRONG, stdin.ground_truth) == 0.25  # max == sum only for the 1-number test
    assert code.score(FUNC_RIGHT, func.ground_truth) == 1.0
    assert code.score(FUNC_WRONG, func.ground_truth) == pytest.approx(2 / 3)


def test_bad_rows_name_file_and_line(tmp_path):
    root = tmp_path / "livecodebench"
    root.mkdir()
    bad = dict(TWO_SUM, metadata="{}")  # functional tests without a func_name
    (root / "test.jsonl").write_text(json.dumps(SUM_STDIN) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl: line 2: ValueError: test types \['functional'\]"):
        load_benchmark("lcb_v2", tmp_path)
