"""TFDS builder for Eurus-2-RL-Data: prepare from local Parquet and read back, all without TensorFlow."""

import sys

import pyarrow as pa
import pyarrow.parquet as pq

from prime_jax.data.eurus import EURUS_ARROW_SCHEMA, example_to_row, read_eurus, write_eurus
from prime_jax.data.prompts import SYSTEM_PROMPT
from prime_jax.data.synthetic import make_tasks
from prime_jax.data.tfds_reader import iter_tfds_rows, read_tfds
from third_party.eurus2_rl_data.prepare import prepare


def _fields(examples):
    return [(e.prompt, e.ability, e.ground_truth, e.data_source) for e in examples]


def test_prepare_and_read_back_without_tensorflow(tmp_path):
    manual = tmp_path / "manual"
    train = make_tasks(30, seed=0, difficulty=2, system_prompt=SYSTEM_PROMPT)
    write_eurus(train[:20], str(manual / "train-00000.parquet"))
    write_eurus(train[20:], str(manual / "train-00001.parquet"))
    broken = example_to_row(train[0], split="validation", index=99)
    broken["reward_model"]["ground_truth"] = None
    broken["extra_info"] = None
    val_rows = [example_to_row(t, split="validation", index=i) for i, t in enumerate(train[:3])] + [broken]
    pq.write_table(pa.Table.from_pylist(val_rows, schema=EURUS_ARROW_SCHEMA), manual / "validation.parquet")

    dataset_dir = prepare(tmp_path / "tfds", manual_dir=manual)
    assert dataset_dir.name == "1.0.0" and dataset_dir.parent.name == "eurus2_rl_data"

    # Row for row, in file order: the exact schema rows that went in (nulls as "" / -1).
    expected_val = val_rows[:3] + [
        {**broken, "reward_model": {"style": "rule", "ground_truth": ""}, "extra_info": {"split": "", "index": -1}}
    ]
    assert list(iter_tfds_rows(dataset_dir, "validation")) == expected_val
    expected_train = [example_to_row(t, split="train", index=i % 20) for i, t in enumerate(train)]
    assert list(iter_tfds_rows(dataset_dir, "train")) == expected_train

    from_tfds = read_tfds(dataset_dir, "train")
    from_parquet = read_eurus(str(manual / "train-*.parquet"))
    assert _fields(from_tfds.examples) == _fields(from_parquet.examples) == _fields(train)
    assert [e.uid for e in from_tfds.examples[:2]] == ["train:0", "train:1"]
    val = read_tfds(dataset_dir, "validation")
    assert len(val.examples) == 3 and dict(val.skipped) == {"missing_ground_truth": 1}
    assert "tensorflow" not in sys.modules


def test_prepare_downloads_the_listed_parquet_files(tmp_path, monkeypatch):
    """The download path, against a local HTTP server standing in for the Hugging Face hub."""
    import functools
    import http.server
    import json
    import threading

    from third_party.eurus2_rl_data import eurus2_rl_data_dataset_builder as builder_module

    served = tmp_path / "hub"
    tasks = make_tasks(6, seed=2, difficulty=1)
    write_eurus(tasks[:4], str(served / "train-0.parquet"))
    write_eurus(tasks[4:], str(served / "validation-0.parquet"), split="validation")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    for split in ("train", "validation"):
        (served / f"{split}.json").write_text(json.dumps([f"{base}/{split}-0.parquet"]))
    monkeypatch.setattr(builder_module, "_HF_PARQUET_LIST", base + "/{split}.json")
    try:
        dataset_dir = prepare(tmp_path / "tfds")
    finally:
        server.shutdown()
        server.server_close()
    assert _fields(read_tfds(dataset_dir, "train").examples) == _fields(tasks[:4])
    assert _fields(read_tfds(dataset_dir, "validation").examples) == _fields(tasks[4:])
