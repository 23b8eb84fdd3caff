"""Evaluation benchmarks of PRIME as `Example`s: MATH-500, AIME, AMC, Minerva, OlympiadBench, HumanEval, MBPP,
LeetCode and LiveCodeBench (prime_jax/data/livecodebench.py).

Reads the public files in their original formats (see ../shared/data/benchmarks/README.md for the
fields). Math ground truth is the answer string; code ground truth is the assert-style JSON
`{"prelude": str, "asserts": [str, ...]}` the code verifier runs after the candidate's code, one
entry per test. Prompts are the PRIME system prompt + question + the math / code suffix, with
the question worded as PRIME's `eval/` scripts word it (HumanEval and MBPP: an instruction naming
the function signature; LeetCode: `prompt_sft`; math: the problem text). `aime24` is the 30 problems of
AIME 2024 that PRIME's Table 1 reports (its eval script scores the whole file and reports the 2024 rows).
A row that cannot give a ground truth is an error naming file and row: these files are curated.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator

from prime_jax.data.example import Example
from prime_jax.data.livecodebench import WINDOWS, read_livecodebench
from prime_jax.data.prompts import build_messages

# name -> (file name, ability); lcb_v2 reads a folder with the LiveCodeBench release's test*.jsonl files.
BENCHMARK_FILES = {
    "math500": ("math500.json", "math"),
    "aime24": ("aime_2022_2024.jsonl", "math"),
    "aime": ("aime_2022_2024.jsonl", "math"),
    "amc": ("amc_2022_2023.jsonl", "math"),
    "minerva": ("minerva_math.jsonl", "math"),
    "olympiadbench": ("olympiadbench.jsonl", "math"),
    "humaneval": ("humaneval.jsonl.gz", "code"),
    "mbpp": ("mbpp.json", "code"),
    "leetcode": ("leetcode.jsonl", "code"),
    "lcb_v2": ("livecodebench", "code"),
}

# Response token limit of PRIME's evaluation (docs/prime_spec.md §6.1): Minerva and OlympiadBench through the
# Qwen2.5-Math harness (4096); LiveCodeBench through lcb_runner, whose default PRIME's eval/run.sh keeps.
MAX_NEW_TOKENS = {"math500": 8192, "leetcode": 8192, "aime24": 4096, "aime": 4096, "amc": 4096, "minerva": 4096,
                  "olympiadbench": 4096, "humaneval": 4096, "mbpp": 4096, "lcb_v2": 2000}

# The columns of the paper's Table 1 (docs/prime_spec.md §6.2): (heading, benchmark name).
TABLE1 = (("AIME24", "aime24"), ("AMC", "amc"), ("MATH-500", "math500"), ("Minerva", "minerva"),
          ("OlympiadBench", "olympiadbench"), ("LeetCode", "leetcode"), ("LCB v2", "lcb_v2"))


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def format_number(value: float | int | str) -> str:
    """AMC answers are floats: 142.0 -> "142", 0.5 -> "0.5"."""
    if isinstance(value, str):
        return value.strip()
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def join_final_answers(answers: list[str]) -> str:
    """OlympiadBench `final_answer` list -> one string: `$` math delimiters dropped, joined by ", "."""
    parts = [re.sub(r"(?<!\\)\$", "", a).strip() for a in answers]
    return ", ".join(p for p in parts if p)


def code_truth(prelude: str, asserts: list[str]) -> str:
    """The assert-style code ground truth JSON."""
    return json.dumps({"prelude": prelude, "asserts": asserts})


def _node_source(lines: list[str], node: ast.stmt) -> str:
    """Source text of a top-level statement (whole lines), given the script's lines."""
    return "\n".join(lines[node.lineno - 1 : node.end_lineno])


def _top_level_imports(code: str) -> list[str]:
    lines = code.splitlines()
    return [_node_source(lines, n) for n in ast.parse(code).body if isinstance(n, (ast.Import, ast.ImportFrom))]


def _assigned_names(nodes: list[ast.stmt]) -> set[str]:
    return {t.id for n in nodes if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


def split_assert_script(script: str) -> tuple[str, list[str]]:
    """Split a test script into (prelude, one test per assert).

    Each test is its assert plus the statements between it and the previous assert (LeetCode's
    `test_input = {...}` lines), so every test runs on its own after the prelude. Before the first
    assert, assignments to names that the later tests assign again belong to the first test;
    everything else before it is the prelude (e.g. `my_solution = Solution()`, helper lambdas).
    Statements after the last assert go with the last test.
    """
    tree = ast.parse(script)
    groups: list[list[ast.stmt]] = [[]]
    for node in tree.body:
        groups[-1].append(node)
        if isinstance(node, ast.Assert):
            groups.append([])
    trailing = groups.pop()
    if not groups:
        raise ValueError("test script has no assert statement")
    groups[-1].extend(trailing)
    per_test_names = _assigned_names([n for g in groups[1:] for n in g])
    first = groups[0]
    cut = len(first) - 1  # index of the first assert
    while cut > 0:
        prev = first[cut - 1]
        if not (isinstance(prev, ast.Assign) and _assigned_names([prev]) and _assigned_names([prev]) <= per_test_names):
            break
        cut -= 1
    lines = script.splitlines()
    prelude = "\n".join(_node_source(lines, n) for n in first[:cut])
    groups[0] = first[cut:]
    return prelude, ["\n".join(_node_source(lines, n) for n in g) for g in groups]


def _read_jsonl(path: str) -> Iterator[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


# Each reader yields (row id, question, ground truth).
Rows = Iterator[tuple[str, str, str]]


def _math500(path: str) -> Rows:
    with open(path, encoding="utf-8") as f:
        cols = json.load(f)  # {"problem": {"0": ..., ...}, "expected_answer": {...}, ...}
    for key in sorted(cols["problem"], key=int):
        yield cols["id"][key], cols["problem"][key], cols["expected_answer"][key]


def _aime(path: str) -> Rows:
    # Row number as id: AMC's `id` restarts within the file.
    for i, row in enumerate(_read_jsonl(path)):
        yield str(i), row["question"], format_number(row["answer"])


def _aime24(path: str) -> Rows:
    """AIME rows of 2024 (url .../2024_AIME_I_Problems/...), ids = row numbers in the whole file."""
    for (row_id, question, answer), row in zip(_aime(path), _read_jsonl(path)):
        if "/2024_AIME_" in row["url"]:
            yield row_id, question, answer


def _minerva(path: str) -> Rows:
    for row in _read_jsonl(path):
        yield str(row["idx"]), row["problem"], last_boxed(row["solution"]) or ""


def _olympiadbench(path: str) -> Rows:
    for row in _read_jsonl(path):
        question = row["question"] if not row.get("context") else f"{row['context']}\n{row['question']}"
        yield str(row["id"]), question, join_final_answers(row["final_answer"])


def humaneval_question(prompt: str, entry_point: str) -> str:
    """PRIME's HumanEval instruction (eval/ human_eval script): the signature, then the prompt code fenced."""
    match = re.search(rf"def\s+({re.escape(entry_point)}.*?):\s*\n", prompt)
    if match is None:
        raise ValueError(f"no 'def {entry_point}' in the HumanEval prompt")
    return (
        "Write Python code to solve the task.\n"
        f"Write a Python function `{match.group(1)}` to solve the following problem: Present code in ```python```\n"
        f"```python\n{prompt}\n```\n"
    )


def mbpp_question(description: str, code: str, first_test: str) -> str:
    """PRIME's MBPP instruction (eval/ mbpp script): signature of the reference `def`, task, first test."""
    def_line = next((line.strip() for line in code.splitlines() if line.strip().startswith("def ")), None)
    if def_line is None:
        raise ValueError("MBPP reference code has no 'def'")
    signature = def_line.removeprefix("def ").replace(" ", "").rstrip(":").replace(",", ", ")
    description = description.split(" https://www.")[0]
    return (
        "Write Python code to solve the task.\n"
        f"Write a Python function `{signature}` to solve the following problem: Present code in ```python and ```\n"
        f"{description}\n"
        f"The code should pass the following test cases:>>> {first_test}\n\n Let's coding step by step.\n"
    )


def _humaneval(path: str) -> Rows:
    for row in _read_jsonl(path):
        # The test's check() may use names the prompt imports (math, typing, ...).
        prelude = "\n".join([*_top_level_imports(row["prompt"]), row["test"]])
        question = humaneval_question(row["prompt"], row["entry_point"])
        yield row["task_id"], question, code_truth(prelude, [f"check({row['entry_point']})"])


def _mbpp(path: str) -> Rows:
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    for row in rows:
        question = mbpp_question(row["prompt"], row["code"], row["test_list"][0])
        yield str(row["task_id"]), question, code_truth("\n".join(row["test_imports"]), row["test_list"])


def _leetcode(path: str) -> Rows:
    for row in _read_jsonl(path):
        prelude, asserts = split_assert_script(row["test"])
        # prompt_sft: the problem then the starter code in a ```python fence (chat-model form).
        yield str(row["task_id"]), row["prompt_sft"], code_truth(prelude, asserts)


_READERS: dict[str, Callable[[str], Rows]] = {
    "math500": _math500,
    "aime24": _aime24,
    "aime": _aime,
    "amc": _aime,  # same fields; AMC answers are floats, format_number handles both
    "minerva": _minerva,
    "olympiadbench": _olympiadbench,
    "humaneval": _humaneval,
    "mbpp": _mbpp,
    "leetcode": _leetcode,
    "lcb_v2": lambda path: read_livecodebench(path, WINDOWS["lcb_v2"]),
}


def benchmark_path(name: str, root: str | os.PathLike) -> str:
    """The file (or folder) benchmark `name` reads under `root`; a one-line error if the name or file is unknown."""
    if name not in BENCHMARK_FILES:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARK_FILES))}")
    path = os.path.join(os.fspath(root), BENCHMARK_FILES[name][0])
    if not os.path.exists(path):
        raise FileNotFoundError(f"benchmark file for {name!r} not found: {path}")
    return path


def load_benchmark(name: str, root: str | os.PathLike) -> list[Example]:
    """All rows of benchmark `name` from the directory `root`; data_source = name, uid = "name/<row id>"."""
    path = benchmark_path(name, root)
    ability = BENCHMARK_FILES[name][1]
    examples = []
    for row_id, question, truth in _READERS[name](path):
        if not truth:
            raise ValueError(f"{path}: row {row_id} has no ground truth")
        examples.append(
            Example(
                prompt=build_messages(question, ability),
                ability=ability,
                ground_truth=truth,
                data_source=name,
                uid=f"{name}/{row_id}",
            )
        )
    return examples
