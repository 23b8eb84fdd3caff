"""TFDS builder for Eurus-2-RL-Data (PRIME-RL/Eurus-2-RL-Data, MIT), written as array_record.

Prepares from local Parquet files in the manual dir (`train*.parquet`, `validation*.parquet`) or,
when the manual dir has none, downloads the dataset's Parquet files from the Hugging Face hub.
Needs no TensorFlow: TFDS encodes features with numpy and array_record writes the shards; the
prepared dataset is read back with `prime_jax.data.tfds_reader` (also TF-free).

Features mirror the published schema; null strings become "" and a missing `extra_info` becomes
{split: "", index: -1}, so a malformed row is kept as is and left for the reader to skip and count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from etils import epath

_HF_REPO = "PRIME-RL/Eurus-2-RL-Data"
# The hub's Parquet listing: a JSON list with the URL of every Parquet file of the split.
_HF_PARQUET_LIST = "https://huggingface.co/api/datasets/" + _HF_REPO + "/parquet/default/{split}"
_SPLITS = ("train", "validation")
_BATCH_ROWS = 4096


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def schema_row(row: dict) -> dict:
    """A raw Parquet row as a dict of exactly the builder's features (nulls made encodable)."""
    reward_model = row.get("reward_model") or {}
    extra_info = row.get("extra_info") or {}
    index = extra_info.get("index")
    return {
        "data_source": _text(row.get("data_source")),
        "prompt": [
            {"role": _text(m.get("role")), "content": _text(m.get("content"))}
            for m in (row.get("prompt") or [])
            if isinstance(m, dict)
        ],
        "ability": _text(row.get("ability")),
        "reward_model": {
            "style": _text(reward_model.get("style")),
            "ground_truth": _text(reward_model.get("ground_truth")),
        },
        "extra_info": {
            "split": _text(extra_info.get("split")),
            "index": index if isinstance(index, int) else -1,
        },
    }


class Builder(tfds.core.GeneratorBasedBuilder):
    """Eurus-2-RL-Data: 482k math + code RL prompts with outcome-verifier ground truth."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "verl-ready schema (data_source, prompt, ability, reward_model, extra_info)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional. Put Eurus-2-RL-Data Parquet files named train*.parquet and/or "
        "validation*.parquet in the manual dir to prepare from them instead of downloading."
    )
    # Metadata files (README.md, CITATIONS.bib) live next to this module, however it is imported.
    pkg_dir_path = epath.Path(__file__).parent

    def __init__(self, *, file_format: str | None = None, **kwargs):
        # array_record by default: TFRecord, TFDS's default, cannot be written without TensorFlow.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "data_source": text,
                    "prompt": tfds.features.Sequence({"role": text, "content": text}),
                    "ability": text,
                    "reward_model": {"style": text, "ground_truth": text},
                    "extra_info": {"split": text, "index": np.int64},
                }
            ),
            homepage="https://huggingface.co/datasets/" + _HF_REPO,
            # Keep file order: row i of the prepared split is row i of the source files.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        files = self._manual_files(dl_manager) or self._download(dl_manager)
        return {split: self._generate_examples(paths) for split, paths in files.items()}

    def _manual_files(self, dl_manager) -> dict[str, list[epath.Path]]:
        try:
            root = dl_manager.manual_dir
        except AssertionError:  # TFDS: manual dir missing or empty
            return {}
        files = {s: sorted(root.glob(f"{s}*.parquet")) for s in _SPLITS}
        return {s: paths for s, paths in files.items() if paths}

    def _download(self, dl_manager) -> dict[str, list[epath.Path]]:
        listings = dl_manager.download({s: _HF_PARQUET_LIST.format(split=s) for s in _SPLITS})
        urls = {s: json.loads(epath.Path(p).read_text()) for s, p in listings.items()}
        return {s: [epath.Path(p) for p in dl_manager.download(u)] for s, u in urls.items()}

    def _generate_examples(self, paths: list[epath.Path]) -> Iterator[tuple[str, dict]]:
        for path in paths:
            with epath.Path(path).open("rb") as f:
                for b, batch in enumerate(pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS)):
                    for i, row in enumerate(batch.to_pylist()):
                        yield f"{epath.Path(path).name}:{b * _BATCH_ROWS + i}", schema_row(row)
