"""Eurus-2-RL-Data schema rows <-> `Example`s, read from / written to JSONL or Parquet files (local or gs://).

Schema (one row): `data_source: str`, `prompt: [{role, content}, ...]`, `ability: "math" | "code"`,
`reward_model: {style: "rule", ground_truth: str}`, `extra_info: {split: str, index: int}`.
Malformed rows are skipped and counted per reason, never fatal: a 482k-row file with a few bad
rows must still train. Code ground truth is validated with the code verifier's own parser.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prime_jax import paths
from prime_jax.data.example import ABILITIES, Example
from prime_jax.data.prompts import SUFFIXES
from prime_jax.verifiers.code import parse_tests

_ROLES = ("system", "user", "assistant")
_PARQUET_BATCH_ROWS = 4096

# Column types of the published Parquet files.
EURUS_ARROW_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ]
)


class SkipRow(Exception):
    """A row that cannot become an `Example`; `reason` is the skip-count key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass
class ReadResult:
    """Examples read plus how many rows were skipped, per reason.

    `missing_suffix` counts kept rows whose user turn does not end with the PRIME task suffix of
    its ability (the dataset is expected to carry it already; the count makes a mismatch visible).
    """

    examples: list[Example]
    skipped: collections.Counter
    missing_suffix: int = 0

    @property
    def rows_read(self) -> int:
        return len(self.examples) + sum(self.skipped.values())


def _check_prompt(prompt: Any) -> list[dict]:
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise SkipRow("bad_prompt", "prompt must be a non-empty list of messages")
    messages = []
    for m in prompt:
        if not isinstance(m, dict):
            raise SkipRow("bad_prompt", f"message is not a dict: {m!r}")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES or not isinstance(content, str):
            raise SkipRow("bad_prompt", f"bad message role/content: {m!r}")
        # Every row repeats the same system prompt: share one string instead of 482k copies.
        messages.append({"role": role, "content": sys.intern(content) if role == "system" else content})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise SkipRow("bad_prompt", "no non-empty user message")
    return messages


def row_to_example(row: Any, uid: str) -> Example:
    """Validate one schema row; raises `SkipRow(reason)` when it cannot be used."""
    if not isinstance(row, dict):
        raise SkipRow("not_a_dict")
    data_source = row.get("data_source")
    if not isinstance(data_source, str) or not data_source:
        raise SkipRow("bad_data_source")
    ability = row.get("ability")
    if ability not in ABILITIES:
        raise SkipRow("unknown_ability", repr(ability))
    reward_model = row.get("reward_model")
    truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if not isinstance(truth, str) or not truth.strip():
        raise SkipRow("missing_ground_truth")
    prompt = _check_prompt(row.get("prompt"))
    if ability == "code":
        try:
            parse_tests(truth)
        except ValueError as e:
            raise SkipRow("bad_code_tests", str(e)) from e
    return Example(prompt=prompt, ability=ability, ground_truth=truth, data_source=data_source, uid=uid)


def example_to_row(example: Example, *, split: str, index: int) -> dict:
    """The Eurus-2-RL-Data schema row of an `Example` (`extra_info` = {split, index})."""
    return {
        "data_source": example.data_source,
        "prompt": [{"role": m["role"], "content": m["content"]} for m in example.prompt],
        "ability": example.ability,
        "reward_model": {"style": "rule", "ground_truth": example.ground_truth},
        "extra_info": {"split": split, "index": index},
    }


def convert_rows(rows: Iterable[tuple[str, Any]]) -> ReadResult:
    """(uid, raw row) pairs -> `ReadResult`; raw rows may be `SkipRow` instances (unreadable lines)."""
    result = ReadResult(examples=[], skipped=collections.Counter())
    for uid, row in rows:
        try:
            if isinstance(row, SkipRow):
                raise row
            ex = row_to_example(row, uid)
        except SkipRow as e:
            result.skipped[e.reason] += 1
            continue
        if not ex.question().endswith(SUFFIXES[ex.ability]):
            result.missing_suffix += 1
        result.examples.append(ex)
    return result


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Glob patterns (local or gs://) -> sorted file list; a pattern that matches nothing is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pattern in patterns:
        matched = paths.glob(pattern)
        if not matched:
            raise FileNotFoundError(f"no data file matches {pattern!r}")
        files.extend(matched)
    return files


def _iter_jsonl(path: str) -> Iterator[Any]:
    with paths.path(path).open("r", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield SkipRow("bad_json", str(e))


def _iter_parquet(path: str) -> Iterator[Any]:
    with paths.path(path).open("rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            yield from batch.to_pylist()


def _iter_file(path: str) -> Iterator[Any]:
    if path.endswith(".parquet"):
        return _iter_parquet(path)
    if path.endswith(".jsonl"):
        return _iter_jsonl(path)
    raise ValueError(f"unsupported data file {path!r}: expected .parquet or .jsonl")


def read_eurus(patterns: str | Sequence[str], *, max_rows_per_file: int | None = None) -> ReadResult:
    """Read Eurus-2-RL-Data schema rows from JSONL / Parquet files or glob patterns (local or gs://).

    uid of a row = "<file name>:<row number in file>" (stable for the same files). `max_rows_per_file`
    reads only the first rows of each file (preflight's quick look).
    """

    def rows() -> Iterator[tuple[str, Any]]:
        for path in expand_paths(patterns):
            name = os.path.basename(path)
            for i, row in enumerate(itertools.islice(_iter_file(path), max_rows_per_file)):
                yield f"{name}:{i}", row

    return convert_rows(rows())


def write_eurus(examples: Sequence[Example], path: str, *, split: str = "train") -> None:
    """Write examples as Eurus-2-RL-Data schema rows; format from the suffix (.parquet / .jsonl)."""
    rows = [example_to_row(ex, split=split, index=i) for i, ex in enumerate(examples)]
    if not path.endswith((".parquet", ".jsonl")):
        raise ValueError(f"unsupported output file {path!r}: expected .parquet or .jsonl")
    out = paths.path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if path.endswith(".parquet"):
        with out.open("wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=EURUS_ARROW_SCHEMA), f)
    else:
        out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
