"""Read a prepared Eurus-2-RL-Data TFDS dataset (array_record) into `Example`s, without TensorFlow.

`tfds.builder_from_directory` rebuilds the features from the prepared `dataset_info.json` /
`features.json` (the builder's code is not needed), and `as_data_source` decodes array_record
rows with TFDS's numpy parser. Rows then go through the same validation and skip counting as the
Parquet / JSONL reader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from prime_jax.data.eurus import ReadResult, convert_rows

_READ_BATCH = 1024


def _to_str(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def decode_row(raw: dict) -> dict:
    """A TFDS-decoded row (bytes, columnar `prompt`) -> the plain schema row dict."""
    prompt = raw["prompt"]
    return {
        "data_source": _to_str(raw["data_source"]),
        "prompt": [
            {"role": _to_str(r), "content": _to_str(c)}
            for r, c in zip(prompt["role"], prompt["content"], strict=True)
        ],
        "ability": _to_str(raw["ability"]),
        "reward_model": {k: _to_str(v) for k, v in raw["reward_model"].items()},
        "extra_info": {
            "split": _to_str(raw["extra_info"]["split"]),
            "index": int(raw["extra_info"]["index"]),
        },
    }


def iter_tfds_rows(dataset_dir: str | os.PathLike, split: str) -> Iterator[dict]:
    """Schema rows of `split`, in prepared order, from `<data_dir>/eurus2_rl_data/<version>`."""
    builder = tfds.builder_from_directory(os.fspath(dataset_dir))
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {dataset_dir}: has {list(builder.info.splits)}")
    source = builder.as_data_source(split=split)
    for start in range(0, len(source), _READ_BATCH):
        indices = list(range(start, min(start + _READ_BATCH, len(source))))
        for raw in source.__getitems__(indices):
            yield decode_row(raw)


def read_tfds(dataset_dir: str | os.PathLike, split: str) -> ReadResult:
    """Validated examples of a prepared split; uid = "<split>:<row number>"."""
    rows = iter_tfds_rows(dataset_dir, split)
    return convert_rows((f"{split}:{i}", row) for i, row in enumerate(rows))
