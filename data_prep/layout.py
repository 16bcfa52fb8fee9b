"""Where a prepared dataset lives on disk; no TensorFlow here, so the CLI checks it before importing TF.

    DATA_DIR/cache/<config>/                                  per-track features and the journal (stage 1)
    DATA_DIR/split-<k>/mtg_jamendo_moodtheme/<config>/1.0.0/  TFRecord shards, dataset_info.json,
                                                              metadata.json, failures.tsv, duplicates.tsv
"""

from __future__ import annotations

from pathlib import Path

DATASET_NAME = "mtg_jamendo_moodtheme"
VERSION = "1.0.0"


def cache_dir(data_dir: str | Path, config_name: str) -> Path:
    """Stage 1's per-track cache; shared by every split, whose files list the same tracks."""
    return Path(data_dir) / "cache" / config_name


def split_data_dir(data_dir: str | Path, split_index: int) -> Path:
    """TFDS data dir of one split: each split's partition of the tracks is its own dataset."""
    return Path(data_dir) / f"split-{split_index}"


def dataset_dir(data_dir: str | Path, config_name: str, split_index: int) -> Path:
    """Where the shards, ``dataset_info.json`` and ``metadata.json`` of a prepared dataset lie."""
    return split_data_dir(data_dir, split_index) / DATASET_NAME / config_name / VERSION


def is_prepared(data_dir: str | Path, config_name: str, split_index: int) -> bool:
    """TFDS renames the dataset dir into place only once it is complete, so its presence suffices."""
    return (dataset_dir(data_dir, config_name, split_index) / "metadata.json").exists()


def prepare_command(data_dir: str | Path, config_name: str, split_index: int) -> str:
    """The CLI line that prepares a dataset, for error messages."""
    return (
        f"python -m data_prep.build --audio_dir AUDIO_DIR --metadata_dir METADATA_DIR "
        f"--data_dir {data_dir} --config {config_name} --split {split_index}"
    )
