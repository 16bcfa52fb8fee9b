"""Stage 2 of a build (data_prep.preparation): the TFDS dataset of TFRecord shards and the record index that reads
them at random.

Record layout, chosen for training speed: a track longer than ``chunk_frames`` frames is split into
consecutive non-overlapping chunks (the last one shorter), one example each, with the spectrogram stored
time-major, (frames, n_mels) or for a stereo setting (frames, channels, n_mels), as raw float16 bytes, so that any
run of frames is one contiguous byte range.
Shuffling at write time is disabled, so a split's examples lie in TSV order with a track's chunks consecutive.

After the shards, ``record_index.npz`` is written beside them: for every chunk, its shard and the byte offset of
its spectrogram in that shard; for every track, its frames, first chunk and labels. ``data_prep.reader`` reads
any frames of any track through it, without TensorFlow. Tags, feature settings, per-mel-bin mean and std over
every training frame (of every channel, in the shape of one frame), the track ids and the failures report are in
the dataset's ``metadata.json``.
See docs/architecture.md, "Prepared data".
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# TensorFlow only serialises records here: keep its C++ start-up chatter out of the build's log (its oneDNN notice
# ignores TF_CPP_MIN_LOG_LEVEL; oneDNN only speeds up TensorFlow's own ops, and none computes our features).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf
import tensorflow_datasets as tfds
import tqdm
from tensorflow.core.example import example_pb2
from tensorflow_datasets.core import writer as tfds_writer

from data_prep import extract, files, layout
from data_prep import features as features_lib
from data_prep import metadata as metadata_lib
from data_prep.reader import PARTS, RECORD_FOOTER, RECORD_HEADER, scan_records


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What stage 2 writes: per part, the tracks (in TSV order) whose features are cached."""

    cache: extract.TrackCache
    settings: features_lib.FeatureSettings  # the builder config's, with the build's chunk length
    tags: tuple[str, ...]
    parts: dict[str, tuple[metadata_lib.Track, ...]]
    extra_metadata: dict  # JSON-serialisable: failures, duplicates, split index


def num_chunks(frames: int, chunk_frames: int) -> int:
    return max(1, math.ceil(frames / chunk_frames))


# Frames of a track's cached features that the statistics pass holds at a time (in float64: 8 MiB at 256 bins).
STATISTICS_BLOCK_FRAMES = 4096


def frame_statistics(arrays: Iterator[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-column mean and (population) std over the rows (frames) of all arrays, streamed in float64.

    Chan's pairwise update merges one array at a time (a block of a track's frames: `STATISTICS_BLOCK_FRAMES`), so
    neither memory nor precision depends on the number of tracks or on their length. Within a block, one pass: the
    sum and the sum of squares in float64 (a block's squared deviations then differ from a second pass's by about
    1e-15 of them on log-mel values; a quarter of the time).
    """
    count, mean, m2 = 0, None, None
    for array in arrays:
        values = np.asarray(array, dtype=np.float64)
        n = values.shape[0]
        track_mean = values.sum(axis=0) / n
        track_m2 = np.maximum(np.einsum("ij,ij->j", values, values) - n * np.square(track_mean), 0.0)
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


def frames_by_bins(values: np.ndarray) -> np.ndarray:
    """Cached features (frames, n_mels) or (frames, channels, n_mels) as (every channel's frames, n_mels): the columns
    whose statistics normalise them, pooled over the channels as the authors' `d18_stereo` normalisation pools them."""
    return values.reshape(-1, values.shape[-1])


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


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """The info of a dataset built here, which has no published copy: TFDS would look for one in a new temporary
    folder that it leaves behind, one per build, in the system's temporary folder."""

    def initialize_from_bucket(self) -> None:
        """Nothing to read: the info is the builder's own."""


class MtgJamendoMoodtheme(tfds.core.GeneratorBasedBuilder):
    """Spectrogram chunks with multi-hot labels of any tag set (an MTG-Jamendo subset's or a collection's: the plan's
    tags, which the metadata stores); written from a ``ShardPlan``, whose feature settings (those of the builder
    config's name, with the build's chunk length) it stores."""

    VERSION = tfds.core.Version(layout.VERSION)
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=name, version=layout.VERSION, description=features_lib.CONFIG_DESCRIPTIONS[name])
        for name in features_lib.CONFIGS
    ]

    def __init__(self, *, plan: ShardPlan, progress: bool = False, **kwargs) -> None:
        self._plan = plan
        self._progress = progress
        super().__init__(**kwargs)

    @property
    def _settings(self) -> features_lib.FeatureSettings:
        return self._plan.settings

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description=features_lib.CONFIG_DESCRIPTIONS[self.builder_config.name],
            features=tfds.features.FeaturesDict(
                {
                    "spectrogram": tfds.features.Tensor(
                        shape=(None, *self._settings.frame_shape),
                        dtype=np.float16,
                        encoding=tfds.features.Encoding.BYTES,
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
        train = tqdm.tqdm(train, desc="normalisation statistics", unit="track", disable=not self._progress)
        mean, std, count = frame_statistics(
            frames_by_bins(block)
            for track in train
            for block in self._plan.cache.frame_blocks(track.track_id, STATISTICS_BLOCK_FRAMES)
        )
        frame_shape = self._settings.frame_shape
        self.info.metadata.update(
            tags=list(self._plan.tags),
            features=self._settings.to_dict(),
            mean=np.broadcast_to(mean.astype(np.float32), frame_shape).tolist(),
            std=np.broadcast_to(std.astype(np.float32), frame_shape).tolist(),
            num_train_frames=count // self._settings.channels,
            track_ids={part: [track.track_id for track in tracks] for part, tracks in self._plan.parts.items()},
            **self._plan.extra_metadata,
        )
        return {part: self._generate_examples(part) for part in PARTS}

    def _make_download_manager(self, download_dir, download_config) -> types.SimpleNamespace:
        """A local build downloads nothing: TFDS's download manager would parse the checksum files of every dataset
        TFDS knows (0.23 s of the build's serial part) only for the size downloaded, 0, that it records."""
        del download_dir, download_config
        return types.SimpleNamespace(downloaded_size=0)

    def _log_download_bytes(self) -> None:
        """TFDS announces the size of a download here; a local build downloads nothing ("Unknown size")."""

    def _log_download_done(self) -> None:
        """The build ends with its own summary of what it wrote."""

    def _generate_examples(self, part: str):
        chunk_frames = self._settings.chunk_frames
        for track in self._plan.parts[part]:
            frames = self._plan.cache.frame_count(track.track_id)
            chunks = num_chunks(frames, chunk_frames)
            labels = metadata_lib.track_labels(track, self._plan.tags)
            for index, values in enumerate(self._plan.cache.frame_blocks(track.track_id, chunk_frames)):
                yield (
                    f"{track.track_id}/{index:05d}",
                    {
                        "spectrogram": values,
                        "labels": labels,
                        "track_id": track.track_id,
                        "artist_id": track.artist_id,
                        "duration": np.float32(track.duration),
                        "chunk_index": np.int32(index),
                        "num_chunks": np.int32(chunks),
                        "num_frames": np.int32(frames),
                    },
                )


def write_shards(
    plan: ShardPlan, data_dir: str | Path, config_name: str, split_index: int, progress: bool = False
) -> Path:
    """Writes the shards, then their record index (TFDS renames its temporary dir at the end, and the index is
    written last, atomically: a killed write just reruns, reusing complete shards). `progress`: the bars of the
    statistics pass and of TFDS's generation and writing passes."""
    split_dir = layout.split_data_dir(data_dir, split_index)
    # TFDS writes into `incomplete.<random>_<version>/` beside the final folder: a killed write leaves one behind.
    for stale in layout.dataset_dir(data_dir, config_name, split_index).parent.glob("incomplete.*"):
        shutil.rmtree(stale)
    tfds.display_progress_bar(progress)
    builder = MtgJamendoMoodtheme(plan=plan, progress=progress, data_dir=str(split_dir), config=config_name)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
        )
    except (tf.errors.OpError, RuntimeError) as error:  # TFDS re-raises TensorFlow's as RuntimeError
        disk_full = _disk_full(error)
        if disk_full is None:
            raise
        raise disk_full from error
    directory = Path(builder.data_dir)
    write_record_index(
        directory,
        {part: builder.info.splits[part].filenames for part in PARTS},
        len(plan.tags),
        math.prod(plan.settings.frame_shape),
    )
    return directory


def _disk_full(error: Exception) -> OSError | None:
    """The OSError of a full disk (or a file-size limit) that TensorFlow's error for a failed write stands for, or
    None: TensorFlow keeps the system's message, not the errno."""
    message = str(error).strip().splitlines()[-1] if str(error).strip() else ""
    for number in files.DISK_FULL_ERRNOS:
        if os.strerror(number) in message:
            return OSError(number, message)
    return None


def _records(path: Path) -> Iterator[tuple[int, bytes]]:
    """(file offset of the data, data) of every record of a TFRecord file, in order, each record's checksums
    checked: the index describes whole records only."""
    bounds, problems = scan_records(path)
    if problems:
        raise ValueError(problems[0])
    with path.open("rb") as shard:
        for start, end in zip(bounds[:-1], bounds[1:]):
            shard.seek(start + RECORD_HEADER.size)
            yield int(start) + RECORD_HEADER.size, shard.read(end - start - RECORD_HEADER.size - RECORD_FOOTER.size)


# Bytes of a spectrogram's start searched for in its record; the match is then compared whole.
_PAYLOAD_PREFIX_BYTES = 64


def _payload_offset(data: bytes, payload: bytes) -> int:
    """Where `payload` starts in a record's serialized Example: found by its first bytes and checked whole, about
    ten times faster than searching for the whole of a spectrogram's bytes."""
    start = data.find(payload[:_PAYLOAD_PREFIX_BYTES])
    while start >= 0 and not data.startswith(payload, start):
        start = data.find(payload[:_PAYLOAD_PREFIX_BYTES], start + 1)
    if start < 0:
        raise ValueError("a record's spectrogram is not among its bytes")
    return start


def write_record_index(directory: Path, shard_files: dict[str, list[str]], num_tags: int, frame_values: int) -> None:
    """Scans the shards once and writes ``record_index.npz`` (see the module docstring); checks the TSV order and
    that each spectrogram is whole frames of `frame_values` float16 values."""
    arrays: dict[str, np.ndarray] = {}
    for part, filenames in shard_files.items():
        shards, offsets, track_ids, frames, first_chunk, labels = [], [], [], [], [], []
        for shard_number, filename in enumerate(filenames):
            for data_offset, data in _records(directory / filename):
                example = example_pb2.Example.FromString(data).features.feature
                payload = example["spectrogram"].bytes_list.value[0]
                chunk_index = example["chunk_index"].int64_list.value[0]
                if chunk_index == 0:
                    track_ids.append(example["track_id"].bytes_list.value[0].decode())
                    first_chunk.append(len(offsets))
                    frames.append(example["num_frames"].int64_list.value[0])
                    labels.append(np.asarray(example["labels"].int64_list.value, bool))
                elif chunk_index != len(offsets) - first_chunk[-1]:
                    raise ValueError(f"{filename}: chunk {chunk_index} of a track out of order")
                if len(payload) % (2 * frame_values):
                    raise ValueError(
                        f"{filename}: a spectrogram of {len(payload)} bytes is not float16 x {frame_values}"
                    )
                shards.append(shard_number)
                offsets.append(data_offset + _payload_offset(data, payload))
        arrays |= {
            f"{part}/shard_files": np.asarray(filenames, dtype=str),
            f"{part}/chunk_shard": np.asarray(shards, np.int32),
            f"{part}/chunk_offset": np.asarray(offsets, np.int64),
            f"{part}/track_ids": np.asarray(track_ids, dtype=str),
            f"{part}/track_frames": np.asarray(frames, np.int64),
            f"{part}/track_first_chunk": np.asarray(first_chunk, np.int64),
            f"{part}/track_labels": np.asarray(labels, bool).reshape(len(labels), num_tags),
        }
    temporary = directory / f".{layout.RECORD_INDEX_NAME}.{os.getpid()}.tmp"
    with temporary.open("wb") as out:
        np.savez(out, **arrays)
    os.replace(temporary, directory / layout.RECORD_INDEX_NAME)
