"""The read side of a prepared dataset: its metadata, labels and any frames of any track, without TensorFlow.

This is the one module through which training, evaluation and inference read prepared data; it imports no
writer. Frames come straight from the TFRecord shards: ``record_index.npz`` (written by ``shard_writer``) gives, for
every stored chunk, its shard and the byte offset of its time-major float16 spectrogram, so a run of frames is
one ``os.pread`` per chunk it touches and reads exactly its own bytes. A frame is (n_mels,), or (channels, n_mels)
for a stereo setting (`time_major`). See docs/architecture.md, "Prepared data".
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import numpy as np

from data_prep import features as features_lib
from data_prep import layout

PARTS: tuple[str, ...] = ("train", "validation", "test")
STORED_DTYPE = np.dtype(np.float16)


def time_major(values: np.ndarray) -> np.ndarray:
    """Features (n_mels, frames) or (channels, n_mels, frames) in the stored layout, (frames, n_mels) or
    (frames, channels, n_mels): a run of frames is one contiguous byte range, a frame's channels side by side."""
    return np.moveaxis(values, -1, 0)


@dataclasses.dataclass(frozen=True)
class Part:
    """The tracks of one part of a split, in TSV order, and where their chunks lie."""

    track_ids: tuple[str, ...]
    frames: np.ndarray  # (tracks,) frames per track
    labels: np.ndarray  # (tracks, tags) bool
    first_chunk: np.ndarray  # (tracks,) index of each track's first chunk in chunk_shard/chunk_offset
    chunk_shard: np.ndarray  # (chunks,) shard number
    chunk_offset: np.ndarray  # (chunks,) byte offset of the chunk's spectrogram in its shard
    shard_paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.track_ids)


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset as the training code sees it."""

    directory: Path
    tags: tuple[str, ...]
    features: dict
    # The shape of one stored frame, `frame_shape`: per mel bin over every training frame (and every channel of a
    # stereo setting, whose rows are equal: the authors' `d18_stereo` normalisation pools the channels).
    mean: np.ndarray
    std: np.ndarray
    chunk_frames: int
    parts: dict[str, Part]
    tsv_track_ids: dict[str, tuple[str, ...]]  # every track of each part's TSV, in TSV order (the official rows)
    failure_records: tuple[dict, ...]  # one per track of the split left out: track_id, part, path, kind, reason

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """One stored frame: (n_mels,), or (channels, n_mels) for a stereo setting."""
        return features_lib.FeatureSettings(**self.features).frame_shape

    @property
    def track_ids(self) -> dict[str, tuple[str, ...]]:
        return {name: part.track_ids for name, part in self.parts.items()}

    @property
    def num_examples(self) -> dict[str, int]:
        """Stored chunks (TFRecord examples) per part."""
        return {name: len(part.chunk_offset) for name, part in self.parts.items()}

    @property
    def failures(self) -> dict[str, str]:
        """Track id -> "kind: reason" for every track of the split not in the shards."""
        return {record["track_id"]: f"{record['kind']}: {record['reason']}" for record in self.failure_records}

    def missing(self, part: str) -> list[dict]:
        """The failure records of one part: tracks of its TSV that are not in the shards."""
        return [record for record in self.failure_records if record["part"] == part]

    @property
    def failures_report(self) -> Path:
        return self.directory / "failures.tsv"


def load_prepared(data_dir: str | Path, config_name: str = "hop512", split_index: int = 0) -> PreparedDataset:
    """A prepared dataset, read from its directory alone (no audio, no rebuild, no TensorFlow)."""
    directory = layout.dataset_dir(data_dir, config_name, split_index)
    if not layout.is_prepared(data_dir, config_name, split_index):
        older = sorted(p.name for p in directory.parent.glob("*.*.*") if p.is_dir() and p.name != layout.VERSION)
        reason = (
            f"only an older layout ({', '.join(older)}) is there; "
            if older
            else "its shards have no record index yet; "
            if layout.has_shards(data_dir, config_name, split_index)
            else ""
        )
        raise FileNotFoundError(
            f"no prepared dataset {config_name!r} of split {split_index} at {directory}; {reason}prepare it with: "
            f"{layout.prepare_command(data_dir, config_name, split_index)}"
        )
    stored = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
    with np.load(directory / layout.RECORD_INDEX_NAME) as index:
        parts = {name: _part(index, name, directory) for name in PARTS}
    for name, part in parts.items():
        if list(part.track_ids) != list(stored["track_ids"][name]):
            raise ValueError(f"{directory}: the record index of {name} does not list the tracks of metadata.json")
    return PreparedDataset(
        directory=directory,
        tags=tuple(stored["tags"]),
        features=stored["features"],
        mean=np.asarray(stored["mean"], dtype=np.float32),
        std=np.asarray(stored["std"], dtype=np.float32),
        chunk_frames=int(stored["features"]["chunk_frames"]),
        parts=parts,
        tsv_track_ids={name: tuple(ids) for name, ids in stored["tsv_track_ids"].items()},
        failure_records=tuple(stored["failures"]),
    )


def _part(index, name: str, directory: Path) -> Part:
    return Part(
        track_ids=tuple(str(track_id) for track_id in index[f"{name}/track_ids"]),
        frames=index[f"{name}/track_frames"],
        labels=index[f"{name}/track_labels"],
        first_chunk=index[f"{name}/track_first_chunk"],
        chunk_shard=index[f"{name}/chunk_shard"],
        chunk_offset=index[f"{name}/chunk_offset"],
        shard_paths=tuple(directory / str(filename) for filename in index[f"{name}/shard_files"]),
    )


class FrameReader:
    """Reads frames [start, stop) of a track as float16 (frames, *frame_shape); thread-safe, and picklable for
    loader processes (each process opens its own files). Counts the spectrogram bytes it has read."""

    def __init__(self, prepared: PreparedDataset):
        self._parts = prepared.parts
        self._chunk_frames = prepared.chunk_frames
        self._frame_shape = prepared.frame_shape
        self._files: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _descriptor(self, path: Path) -> int:
        with self._lock:
            if path not in self._files:
                self._files[path] = os.open(path, os.O_RDONLY)
            return self._files[path]

    def read(self, part: str, track: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames [start, stop) (default: the whole track) of track number `track` of `part`."""
        entry = self._parts[part]
        frames = int(entry.frames[track])
        stop = frames if stop is None else stop
        if not 0 <= start < stop <= frames:
            raise IndexError(f"frames [{start}, {stop}) outside track {entry.track_ids[track]} of {frames} frames")
        out = np.empty((stop - start, *self._frame_shape), STORED_DTYPE)
        row_bytes = out[0].nbytes
        first = start // self._chunk_frames
        for chunk in range(first, (stop - 1) // self._chunk_frames + 1):
            chunk_start = chunk * self._chunk_frames
            begin, end = max(start, chunk_start), min(stop, chunk_start + self._chunk_frames)
            record = entry.first_chunk[track] + chunk
            target = memoryview(out[begin - start : end - start]).cast("B")
            offset = int(entry.chunk_offset[record]) + (begin - chunk_start) * row_bytes
            got = os.preadv(self._descriptor(entry.shard_paths[entry.chunk_shard[record]]), [target], offset)
            if got != len(target):
                raise OSError(f"short read in {entry.shard_paths[entry.chunk_shard[record]]} at byte {offset}")
            with self._lock:
                self.bytes_read += got
        return out

    def close(self) -> None:
        with self._lock:
            for descriptor in self._files.values():
                os.close(descriptor)
            self._files.clear()
