"""LiveCodeBench code-generation problems from the public release files, as (row id, question, tests) rows.

The release (`livecodebench/code_generation_lite`, read by lcb_runner's `CodeGenerationProblem`) is a
set of JSONL files `test.jsonl`, `test2.jsonl`, ... (release_v1 is the first file, each later release
adds one). A row has `question_id`, `question_title`, `question_content`, `platform`, `contest_date`
(ISO datetime), `starter_code` (empty for stdin problems), `difficulty`, `public_test_cases` (a JSON
list of `{"input", "output", "testtype": "stdin" | "functional"}`), `private_test_cases` (the same
list, either as JSON text or, as the release ships most of them, the JSON text pickled, then
zlib-compressed, then base64-encoded) and `metadata` (JSON text; `func_name` for functional problems).

Benchmark versions are date windows over the contest dates, compared as lcb_runner's `compute_scores`
compares them (`start <= contest_date <= end`, both at midnight): PRIME reports v2 =
2023-05-01 ... 2024-05-31. The question is worded as lcb_runner words it for PRIME's models
(`get_generic_question_template_answer`, then PRIME's code suffix, added by `build_messages`). The tests
become the code verifier's APPS ground truth, public tests first: stdin/stdout texts, or, with
`fn_name`, one JSON value per input line and the JSON-decoded expected return value.
"""

from __future__ import annotations

import base64
import datetime
import glob
import io
import json
import os
import pickle
import re
import zlib
from collections.abc import Iterator

# name -> (first contest date, last contest date), inclusive, as PRIME's eval/run.sh scores them.
WINDOWS = {"lcb_v2": (datetime.datetime(2023, 5, 1), datetime.datetime(2024, 5, 31))}

_WITH_STARTER = ("You will use the following starter code to write the solution to the problem and enclose your "
                 "code within delimiters.")
_WITHOUT_STARTER = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly "
                    "test on the sample inputs). Enclose your code within delimiters as follows.")


def decode_private_tests(field: str) -> list[dict]:
    """`private_test_cases` as released: JSON text, or base64(zlib(pickle(JSON text))) -> list of test dicts.

    The pickle holds only a `str` (the JSON text); anything else is an error, so no other object is built.
    """
    try:
        return json.loads(field)
    except ValueError:
        pass
    text = _unpickle_str(zlib.decompress(base64.b64decode(field.encode("ascii"))))
    return json.loads(text)


def encode_private_tests(tests: list[dict]) -> str:
    """The release's compressed form of a test list (inverse of `decode_private_tests`); tests write files with it."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode("ascii")


class _StrOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        raise pickle.UnpicklingError(f"private tests: unexpected object {module}.{name} in the pickle")


def _unpickle_str(data: bytes) -> str:
    value = _StrOnly(io.BytesIO(data)).load()
    if not isinstance(value, str):
        raise ValueError(f"private tests: the pickle holds a {type(value).__name__}, not the JSON text")
    return value


def question_text(content: str, starter_code: str) -> str:
    """lcb_runner's generic question template (PRIME's `LMStyle.Qwen25Math` user turn, before the code suffix)."""
    if starter_code:
        fmt = f"### Format: {_WITH_STARTER}\n```python\n{starter_code}\n```\n\n"
    else:
        fmt = f"### Format: {_WITHOUT_STARTER}\n```python\n# YOUR CODE HERE\n```\n\n"
    return f"### Question:\n{content}\n\n{fmt}### Answer: (use the provided format with backticks)\n\n"


def ground_truth(tests: list[dict], fn_name: str | None) -> str:
    """APPS-style JSON the code verifier runs: stdin/stdout texts, or call-based with `fn_name`."""
    kinds = {t["testtype"] for t in tests}
    want = "functional" if fn_name else "stdin"
    if kinds != {want}:
        raise ValueError(f"test types {sorted(kinds)} do not match the problem ({want}, func_name={fn_name!r})")
    inputs = [t["input"] for t in tests]
    if fn_name is None:
        return json.dumps({"inputs": inputs, "outputs": [t["output"] for t in tests]})
    return json.dumps({"inputs": inputs, "outputs": [json.loads(t["output"]) for t in tests], "fn_name": fn_name})


def release_files(path: str) -> list[str]:
    """The release's `test*.jsonl` files in release order when `path` is a folder; else [path]."""
    if not os.path.isdir(path):
        return [path]
    files = glob.glob(os.path.join(path, "test*.jsonl"))
    number = lambda f: int(re.search(r"test(\d*)\.jsonl$", f).group(1) or 1)  # noqa: E731
    return sorted((f for f in files if re.search(r"test(\d*)\.jsonl$", f)), key=number)


def read_livecodebench(path: str, window: tuple[datetime.datetime, datetime.datetime]) -> Iterator[tuple[str, str, str]]:
    """(question_id, question, ground truth) of every problem in `path` (a release file or folder) dated in `window`."""
    start, end = window
    files = release_files(path)
    if not files:
        raise FileNotFoundError(f"no test*.jsonl release files in {path}")
    for file in files:
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                try:
                    if not start <= datetime.datetime.fromisoformat(row["contest_date"]) <= end:
                        continue
                    fn_name = json.loads(row.get("metadata") or "{}").get("func_name")
                    tests = json.loads(row["public_test_cases"]) + decode_private_tests(row["private_test_cases"])
                    truth = ground_truth(tests, fn_name)
                except (KeyError, ValueError, zlib.error, pickle.UnpicklingError) as exc:
                    raise ValueError(f"{file}: line {line_no}: {type(exc).__name__}: {exc}") from None
                yield row["question_id"], question_text(row["question_content"], row.get("starter_code") or ""), truth
