"""Prepare Eurus-2-RL-Data as array_record without TensorFlow (the `tfds build` CLI imports TF).

    python -m third_party.eurus2_rl_data.prepare --data_dir=DIR [--manual_dir=PARQUET_DIR]

With `--manual_dir` holding train*.parquet / validation*.parquet it prepares from those files,
otherwise it downloads the Parquet files from the Hugging Face hub. Prints the prepared dataset
directory, which is what `prime_jax.data.tfds_reader.read_tfds` takes.
"""

from __future__ import annotations

import argparse
import os

import tensorflow_datasets as tfds
from etils import epath

from third_party.eurus2_rl_data.eurus2_rl_data_dataset_builder import Builder


def prepare(data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None) -> epath.Path:
    """Build the dataset under `data_dir`; returns `<data_dir>/eurus2_rl_data/<version>`."""
    builder = Builder(data_dir=os.fspath(data_dir))
    config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=config)
    return epath.Path(builder.data_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="where the prepared dataset goes")
    parser.add_argument("--manual_dir", default=None, help="directory with the source Parquet files")
    args = parser.parse_args()
    print(prepare(args.data_dir, args.manual_dir))


if __name__ == "__main__":
    main()
