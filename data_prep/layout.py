"""Where a prepared dataset lives on disk; no TensorFlow here, so the CLI checks it before importing TF.

DATA_DIR/cache/<config>/                                  per-track features and the journal (stage 1)
DATA_DIR/split-<k>/mtg_jamendo_moodtheme/<config>/2.0.0/  TFRecord shards, dataset_info.json,
                                                          metadata.json, record_index.npz,
                                                          failures.tsv, duplicates.tsv
"""

from __future__ import annotations

from pathlib import Path

DATASET_NAME = "mtg_jamendo_moodtheme"
# 2.0.0: spectrograms stored time-major (frames, n_mels), so that a crop is one contiguous byte range, and a
# record index beside the shards (see docs/architecture.md, "Prepared data").
VERSION = "2.0.0"
RECORD_INDEX_NAME = "record_index.npz"


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
    """TFDS renames the dataset dir into place only once it is complete; the record index is written last."""
    return (dataset_dir(data_dir, config_name, split_index) / RECORD_INDEX_NAME).exists()


def has_shards(data_dir: str | Path, config_name: str, split_index: int) -> bool:
    """The shards are complete (TFDS renamed them into place), whether or not the record index exists yet."""
    return (dataset_dir(data_dir, config_name, split_index) / "metadata.json").exists()


def prepare_command(data_dir: str | Path, config_name: str, split_index: int) -> str:
    """The CLI line that prepares a dataset, for error messages."""
    return (
        f"python -m data_prep.build --audio_dir AUDIO_DIR --metadata_dir METADATA_DIR "
        f"--data_dir {data_dir} --features {config_name} --split {split_index}"
    )
