"""Stage 2 of a build: the TFDS dataset of TFRecord shards, and ``load_prepared`` to read it back.

Record layout, chosen for training speed: a track longer than ``chunk_frames`` frames is split into
consecutive non-overlapping chunks (the last one shorter), one example each, with the spectrogram stored
as raw float16 bytes. A training crop of at most ``chunk_frames / 2`` frames thus reads at most about
twice its own bytes. Shuffling at write time is disabled, so a split's examples lie in TSV order with a
track's chunks consecutive: evaluation rebuilds whole tracks by concatenating chunks until
``chunk_index == num_chunks - 1``; training shuffles files (``training_read_config``) and a buffer of
examples.

Tags, feature settings, per-mel-bin mean and std over every training frame, the track ids and the failures
report are stored in the dataset's ``metadata.json`` (TFDS writes it with the shards and renames the whole
directory at the end), so ``load_prepared`` needs neither the audio nor this module's builder class.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow.core.example import example_pb2
from tensorflow_datasets.core import writer as tfds_writer

from data_prep import extract
from data_prep import features as features_lib
from data_prep import layout
from data_prep import metadata as metadata_lib

PARTS: tuple[str, ...] = metadata_lib.SPLIT_PARTS
# Shards read at once when training: with shuffled file order, enough to mix tracks of many shards.
TRAINING_INTERLEAVE = 16


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What stage 2 writes: per part, the tracks (in TSV order) whose features are cached."""

    cache: extract.TrackCache
    tags: tuple[str, ...]
    parts: dict[str, tuple[metadata_lib.Track, ...]]
    extra_metadata: dict  # JSON-serialisable: failures, duplicates, split index


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset as the training code sees it."""

    builder: tfds.core.DatasetBuilder
    tags: tuple[str, ...]
    features: dict
    mean: np.ndarray
    std: np.ndarray
    chunk_frames: int
    track_ids: dict[str, tuple[str, ...]]
    num_examples: dict[str, int]
    failures: dict[str, str]  # track id -> "kind: reason", for every track of the split not in the shards


def training_read_config(seed: int | None = None) -> tfds.ReadConfig:
    """Read config for ``as_dataset(split="train", shuffle_files=True, read_config=...)``.

    The shards are written in order (evaluation needs a track's chunks together), and TFDS refuses to
    shuffle an ordered dataset unless its ordering guard is off; it would also read one shard at a time.
    """
    return tfds.ReadConfig(enable_ordering_guard=False, interleave_cycle_length=TRAINING_INTERLEAVE, shuffle_seed=seed)


def num_chunks(frames: int, chunk_frames: int) -> int:
    return max(1, math.ceil(frames / chunk_frames))


def frame_statistics(arrays: Iterator[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-row mean and (population) std over the frames of all arrays, streamed in float64.

    Chan's pairwise update merges one track at a time, so neither memory nor precision depends on the
    number of tracks.
    """
    count, mean, m2 = 0, None, None
    for array in arrays:
        values = np.asarray(array, dtype=np.float64)
        n = values.shape[1]
        track_mean = values.mean(axis=1)
        track_m2 = np.square(values - track_mean[:, None]).sum(axis=1)
        if mean is None:
            count, mean, m2 = n, track_mean, track_m2
            continue
        delta = track_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        m2 = m2 + track_m2 + np.square(delta) * (count * n / total)
        count = total
    if mean is None:
        raise ValueError("no training frames to compute the normalisation statistics from")
    return mean, np.sqrt(m2 / count), count


class DeterministicExampleWriter(tfds_writer.ExampleWriter):
    """Writes each tf.Example with its feature map in sorted key order.

    Protobuf serialises a map in hash order, seeded per process, so the same examples written by two
    processes would differ byte for byte; sorted, a resumed build's shards equal a clean build's.
    """

    def write(self, path, examples):
        canonical = (
            (key, example_pb2.Example.FromString(serialized).SerializeToString(deterministic=True))
            for key, serialized in examples
        )
        return super().write(path, canonical)


class MoodThemeConfig(tfds.core.BuilderConfig):
    """One builder config per feature setting."""

    def __init__(self, *, settings: features_lib.FeatureSettings, **kwargs) -> None:
        super().__init__(version=layout.VERSION, **kwargs)
        self.settings = settings


class MtgJamendoMoodtheme(tfds.core.GeneratorBasedBuilder):
    """MTG-Jamendo mood/theme spectrogram chunks with multi-hot labels; written from a ``ShardPlan``."""

    VERSION = tfds.core.Version(layout.VERSION)
    BUILDER_CONFIGS = [
        MoodThemeConfig(name=name, description=features_lib.CONFIG_DESCRIPTIONS[name], settings=settings)
        for name, settings in features_lib.CONFIGS.items()
    ]

    def __init__(self, *, plan: ShardPlan, **kwargs) -> None:
        self._plan = plan
        super().__init__(**kwargs)

    @property
    def _settings(self) -> features_lib.FeatureSettings:
        return self.builder_config.settings

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=features_lib.CONFIG_DESCRIPTIONS[self.builder_config.name],
            features=tfds.features.FeaturesDict(
                {
                    "spectrogram": tfds.features.Tensor(
                        shape=(self._settings.n_mels, None), dtype=np.float16, encoding=tfds.features.Encoding.BYTES
                    ),
                    "labels": tfds.features.Tensor(shape=(len(self._plan.tags),), dtype=np.bool_),
                    "track_id": tfds.features.Text(),
                    "artist_id": tfds.features.Text(),
                    "duration": tfds.features.Scalar(dtype=np.float32),
                    "chunk_index": tfds.features.Scalar(dtype=np.int32),
                    "num_chunks": tfds.features.Scalar(dtype=np.int32),
                    "num_frames": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _example_writer(self) -> tfds_writer.ExampleWriter:
        return DeterministicExampleWriter(file_format=self.info.file_format)

    def _split_generators(self, dl_manager):
        del dl_manager  # the inputs are the cached features
        train = self._plan.parts["train"]
        mean, std, frames = frame_statistics(self._plan.cache.load(track.track_id) for track in train)
        self.info.metadata.update(
            tags=list(self._plan.tags),
            features=self._settings.to_dict(),
            mean=[float(value) for value in mean.astype(np.float32)],
            std=[float(value) for value in std.astype(np.float32)],
            num_train_frames=frames,
            track_ids={part: [track.track_id for track in tracks] for part, tracks in self._plan.parts.items()},
            **self._plan.extra_metadata,
        )
        return {part: self._generate_examples(part) for part in PARTS}

    def _generate_examples(self, part: str):
        chunk_frames = self._settings.chunk_frames
        for track in self._plan.parts[part]:
            values = self._plan.cache.load(track.track_id)
            chunks = num_chunks(values.shape[1], chunk_frames)
            labels = metadata_lib.track_labels(track, self._plan.tags)
            for index in range(chunks):
                yield f"{track.track_id}/{index:05d}", {
                    "spectrogram": values[:, index * chunk_frames : (index + 1) * chunk_frames],
                    "labels": labels,
                    "track_id": track.track_id,
                    "artist_id": track.artist_id,
                    "duration": np.float32(track.duration),
                    "chunk_index": np.int32(index),
                    "num_chunks": np.int32(chunks),
                    "num_frames": np.int32(values.shape[1]),
                }


def write_shards(plan: ShardPlan, data_dir: str | Path, config_name: str, split_index: int) -> Path:
    """Writes the shards (TFDS renames its temporary dir at the end, so a killed write just reruns)."""
    split_dir = layout.split_data_dir(data_dir, split_index)
    builder = MtgJamendoMoodtheme(plan=plan, data_dir=str(split_dir), config=config_name)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    )
    return Path(builder.data_dir)


def load_prepared(data_dir: str | Path, config_name: str = "hop512", split_index: int = 0) -> PreparedDataset:
    """A prepared dataset, read from its directory alone (no audio, no rebuild)."""
    features_lib.settings_for(config_name)
    directory = layout.dataset_dir(data_dir, config_name, split_index)
    if not layout.is_prepared(data_dir, config_name, split_index):
        raise FileNotFoundError(
            f"no prepared dataset {config_name!r} of split {split_index} at {directory}; prepare it with: "
            f"{layout.prepare_command(data_dir, config_name, split_index)}"
        )
    builder = tfds.builder_from_directory(str(directory))
    stored = dict(builder.info.metadata)
    return PreparedDataset(
        builder=builder,
        tags=tuple(stored["tags"]),
        features=stored["features"],
        mean=np.asarray(stored["mean"], dtype=np.float32),
        std=np.asarray(stored["std"], dtype=np.float32),
        chunk_frames=int(stored["features"]["chunk_frames"]),
        track_ids={part: tuple(ids) for part, ids in stored["track_ids"].items()},
        num_examples={part: builder.info.splits[part].num_examples for part in PARTS},
        failures={record["track_id"]: f"{record['kind']}: {record['reason']}" for record in stored["failures"]},
    )
