"""Eurus-2-RL-Data schema reader/writer: JSONL and Parquet, globs, per-reason skip counts, round trips."""

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prime_jax.data.eurus import EURUS_ARROW_SCHEMA, example_to_row, read_eurus, write_eurus
from prime_jax.data.prompts import SYSTEM_PROMPT, build_messages
from prime_jax.data.synthetic import make_tasks

MATH = {
    "data_source": "numina_olympiads",
    "prompt": build_messages("Find 1+1.", "math"),
    "ability": "math",
    "reward_model": {"style": "rule", "ground_truth": "2"},
    "extra_info": {"split": "dummy", "index": 0},
}
CODE = {
    "data_source": "taco",
    "prompt": build_messages("Read n, print n+1.", "code"),
    "ability": "code",
    "reward_model": {"style": "rule", "ground_truth": json.dumps({"inputs": ["1\n"], "outputs": ["2\n"]})},
    "extra_info": {"split": "dummy", "index": 0},
}


def _with(row, **changes):
    out = json.loads(json.dumps(row))
    out.update(changes)
    return out


BAD_ROWS = {
    "missing_ground_truth": [
        _with(MATH, reward_model={"style": "rule"}),
        _with(MATH, reward_model={"style": "rule", "ground_truth": "  "}),
        _with(MATH, reward_model=None),
    ],
    "unknown_ability": [_with(MATH, ability="chemistry"), _with(MATH, ability=None)],
    "bad_prompt": [
        _with(MATH, prompt="Find 1+1."),
        _with(MATH, prompt=[]),
        _with(MATH, prompt=[{"role": "system", "content": SYSTEM_PROMPT}]),
        _with(MATH, prompt=[{"role": "robot", "content": "hi"}]),
    ],
    "bad_code_tests": [
        _with(CODE, reward_model={"style": "rule", "ground_truth": "{not json"}),
        _with(CODE, reward_model={"style": "rule", "ground_truth": json.dumps({"inputs": ["1\n"]})}),
    ],
    "bad_data_source": [_with(MATH, data_source=None)],
    "not_a_dict": [[1, 2, 3]],
}


def test_jsonl_skips_and_counts_malformed_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(MATH), json.dumps(CODE), "{broken json", ""]
    lines += [json.dumps(r) for rows in BAD_ROWS.values() for r in rows]
    lines.append(json.dumps(_with(MATH, prompt=[{"role": "user", "content": "no suffix"}])))
    path.write_text("\n".join(lines) + "\n")
    result = read_eurus(str(path))
    expected_skips = {k: len(v) for k, v in BAD_ROWS.items()} | {"bad_json": 1}
    assert dict(result.skipped) == expected_skips
    assert [e.uid for e in result.examples] == ["rows.jsonl:0", "rows.jsonl:1", f"rows.jsonl:{len(lines) - 2}"]
    math, code, no_suffix = result.examples
    assert (math.ability, math.ground_truth, math.data_source, math.prompt) == ("math", "2", "numina_olympiads", MATH["prompt"])
    assert (code.ability, code.ground_truth) == ("code", CODE["reward_model"]["ground_truth"])
    assert result.missing_suffix == 1 and no_suffix.question() == "no suffix"
    assert result.rows_read == 3 + sum(expected_skips.values())


def test_parquet_globs_and_nulls(tmp_path):
    tasks = make_tasks(12, seed=0, difficulty=2, system_prompt=SYSTEM_PROMPT)
    write_eurus(tasks[:7], str(tmp_path / "part-0.parquet"))
    write_eurus(tasks[7:], str(tmp_path / "part-1.parquet"))
    null_row = example_to_row(tasks[0], split="train", index=0)
    null_row["reward_model"]["ground_truth"] = None
    pq.write_table(pa.Table.from_pylist([null_row], schema=EURUS_ARROW_SCHEMA), tmp_path / "part-2.parquet")
    result = read_eurus([str(tmp_path / "part-*.parquet")])
    assert result.examples == [
        dataclasses.replace(t, uid=f"part-{i // 7}.parquet:{i % 7}") for i, t in enumerate(tasks)
    ]
    assert dict(result.skipped) == {"missing_ground_truth": 1}
    with pytest.raises(FileNotFoundError, match="nothing"):
        read_eurus(str(tmp_path / "nothing-*.parquet"))


def test_jsonl_and_parquet_globs_in_a_bucket(gcs_bucket):
    """The same files read from gs:// (local GCS emulator): written there, globbed there, read back."""
    tasks = make_tasks(12, seed=0, difficulty=2, system_prompt=SYSTEM_PROMPT)
    root = f"{gcs_bucket}/eurus"
    write_eurus(tasks[:7], f"{root}/part-0.parquet")
    write_eurus(tasks[7:], f"{root}/part-1.jsonl")
    result = read_eurus([f"{root}/part-*.parquet", f"{root}/part-1.*"])
    expected = [dataclasses.replace(t, uid=f"part-0.parquet:{i}") for i, t in enumerate(tasks[:7])]
    expected += [dataclasses.replace(t, uid=f"part-1.jsonl:{i}") for i, t in enumerate(tasks[7:])]
    assert result.examples == expected and not result.skipped
    with pytest.raises(FileNotFoundError, match="nothing"):
        read_eurus(f"{root}/nothing-*.parquet")


def test_write_jsonl_is_the_published_schema(tmp_path):
    tasks = make_tasks(4, seed=1, difficulty=1)
    write_eurus(tasks, str(tmp_path / "t.jsonl"), split="validation")
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert rows[2] == {
        "data_source": tasks[2].data_source,
        "prompt": tasks[2].prompt,
        "ability": tasks[2].ability,
        "reward_model": {"style": "rule", "ground_truth": tasks[2].ground_truth},
        "extra_info": {"split": "validation", "index": 2},
    }
    assert [e.ground_truth for e in read_eurus(str(tmp_path / "t.jsonl")).examples] == [t.ground_truth for t in tasks]
    with pytest.raises(ValueError, match="expected .parquet or .jsonl"):
        write_eurus(tasks, str(tmp_path / "t.csv"))
