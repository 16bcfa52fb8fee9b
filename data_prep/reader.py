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
import math
import os
import struct
import threading
from pathlib import Path

import google_crc32c
import numpy as np

from data_prep import features as features_lib
from data_prep import layout

PARTS: tuple[str, ...] = ("train", "validation", "test")
STORED_DTYPE = np.dtype(np.float16)

# A TFRecord is: uint64 length, uint32 masked CRC-32C of the length, the data, uint32 masked CRC-32C of the data.
RECORD_HEADER = struct.Struct("<QI")
RECORD_FOOTER = struct.Struct("<I")
_CRC_MASK_DELTA = 0xA282EAD8


def time_major(values: np.ndarray) -> np.ndarray:
    """Features (n_mels, frames) or (channels, n_mels, frames) in the stored layout, (frames, n_mels) or
    (frames, channels, n_mels): a run of frames is one contiguous byte range, a frame's channels side by side."""
    return np.moveaxis(values, -1, 0)


def stored_frames(values: np.ndarray) -> np.ndarray:
    """Computed features (n_mels, frames) or (channels, n_mels, frames) as the shards store them: a contiguous
    float16 `time_major` array, cast and transposed in one pass (numpy's cast into the transposed buffer costs no
    more than a plain cast)."""
    stored = np.empty((values.shape[-1], *values.shape[:-1]), STORED_DTYPE)
    np.copyto(stored, time_major(values), casting="same_kind")
    return stored


def masked_crc32c(data: bytes) -> int:
    """The checksum a TFRecord stores: CRC-32C (google-crc32c's C implementation, which releases the GIL) rotated
    right by 15 bits plus a constant (TFRecord's mask)."""
    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


class DamagedRecord(ValueError):
    """A TFRecord whose bytes are not those written; the message names the shard file and the record's byte
    offset."""


def record_problem(record: bytes) -> str | None:
    """What is wrong with one whole TFRecord (header, data, footer), or None."""
    length, length_crc = RECORD_HEADER.unpack_from(record)
    if masked_crc32c(record[:8]) != length_crc:
        return "the checksum of its length does not match"
    if len(record) != RECORD_HEADER.size + length + RECORD_FOOTER.size:
        return f"its length says {length} bytes of data, {len(record) - RECORD_HEADER.size - RECORD_FOOTER.size} there"
    (data_crc,) = RECORD_FOOTER.unpack_from(record, RECORD_HEADER.size + length)
    if masked_crc32c(memoryview(record)[RECORD_HEADER.size : RECORD_HEADER.size + length]) != data_crc:
        return "the checksum of its data does not match"
    return None


def scan_records(path: Path, check_data: bool = True) -> tuple[np.ndarray, list[str]]:
    """(record bounds, problems) of a TFRecord file: the start of each record read, and the end of the last,
    checking every length's checksum (and every record's data with `check_data`). Each problem names the file and
    the byte offset of its record. The scan goes past a record whose data is damaged (its length is sound) and
    stops at a damaged length or a truncated record, after which no record can be found."""
    bounds, problems = [0], []
    size = path.stat().st_size
    with path.open("rb") as shard:
        while (offset := bounds[-1]) < size:
            header = shard.read(RECORD_HEADER.size)
            if len(header) < RECORD_HEADER.size:
                problems.append(f"{path}: record at byte {offset}: truncated in its header ({len(header)} bytes)")
                break
            length, length_crc = RECORD_HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                problems.append(f"{path}: record at byte {offset}: the checksum of its length does not match")
                break
            end = offset + RECORD_HEADER.size + length + RECORD_FOOTER.size
            if end > size:
                there = f"{end - offset} bytes announced, {size - offset} there"
                problems.append(f"{path}: record at byte {offset}: truncated ({there})")
                break
            if check_data:
                problem = record_problem(header + shard.read(length + RECORD_FOOTER.size))
                if problem:
                    problems.append(f"{path}: record at byte {offset}: {problem}")
            else:
                shard.seek(end)
            bounds.append(end)
    return np.asarray(bounds, np.int64), problems


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
        reason = (
            "its shards have no record index yet; " if layout.has_shards(data_dir, config_name, split_index) else ""
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
    loader processes (each process opens its own files). Counts the spectrogram bytes it has read.

    With `verify_checksums`, the first read of each stored chunk by this reader also reads its whole record and
    checks the record's TFRecord checksums (later reads of it trust it, so the cost is one pass over the records
    read, not one per crop); a damaged record raises DamagedRecord naming its shard and byte offset instead of
    giving wrong frames.
    """

    def __init__(self, prepared: PreparedDataset, verify_checksums: bool = False):
        self._parts = prepared.parts
        self._chunk_frames = prepared.chunk_frames
        self._frame_shape = prepared.frame_shape
        self._directory = prepared.directory
        self._files: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.verify_checksums = verify_checksums
        # Per part, which chunks' records this reader has checked; per shard, its record bounds (`scan_records`).
        self._verified = {name: np.zeros(len(part.chunk_offset), bool) for name, part in self._parts.items()}
        self._record_bounds: dict[Path, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_lock": None, "_record_bounds": {}}

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
            if self.verify_checksums and not self._verified[part][record]:
                self._check_record(entry, record)
                self._verified[part][record] = True
            target = memoryview(out[begin - start : end - start]).cast("B")
            offset = int(entry.chunk_offset[record]) + (begin - chunk_start) * row_bytes
            got = os.preadv(self._descriptor(entry.shard_paths[entry.chunk_shard[record]]), [target], offset)
            if got != len(target):
                raise OSError(f"short read in {entry.shard_paths[entry.chunk_shard[record]]} at byte {offset}")
            with self._lock:
                self.bytes_read += got
        return out

    def _check_record(self, entry: Part, record: int) -> None:
        """Reads the whole TFRecord that holds chunk `record` of `entry` and checks its checksums."""
        path = entry.shard_paths[entry.chunk_shard[record]]
        with self._lock:
            if path not in self._record_bounds:
                bounds, problems = scan_records(path, check_data=False)
                if problems:
                    raise DamagedRecord(f"{problems[0]}; {self._advice}")
                self._record_bounds[path] = bounds
            bounds = self._record_bounds[path]
        offset = int(entry.chunk_offset[record])
        number = int(np.searchsorted(bounds, offset, side="right")) - 1
        if not 0 <= number < len(bounds) - 1:
            raise DamagedRecord(f"{path}: byte {offset}: the record index points past the shard's end; {self._advice}")
        start, end = int(bounds[number]), int(bounds[number + 1])
        data = os.pread(self._descriptor(path), end - start, start)
        problem = record_problem(data) if len(data) == end - start else "the file is shorter than when it was scanned"
        if problem:
            raise DamagedRecord(f"{path}: record at byte {start}: {problem}; {self._advice}")

    @property
    def _advice(self) -> str:
        # The dataset directory is DATA_DIR/split-<k>/<dataset>/<config>/<version> (data_prep.layout).
        return (
            f"list every damaged record with: python -m data_prep.verify --data_dir {self._directory.parents[3]}; "
            f"then delete {self._directory} and run data_prep.build again (it reuses its feature cache)"
        )

    def close(self) -> None:
        with self._lock:
            for descriptor in self._files.values():
                os.close(descriptor)
            self._files.clear()


def _chunk_frames(part: Part, chunk_frames: int) -> np.ndarray:
    """Frames of every stored chunk of a part, in record order: whole chunks, then each track's shorter tail."""
    counts = np.maximum(1, -(-part.frames // chunk_frames))
    track = np.repeat(np.arange(len(part)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.minimum(chunk_frames, part.frames[track] - within * chunk_frames)


def _index_problems(part: Part, number: int, bounds: np.ndarray, chunk_bytes: np.ndarray) -> list[str]:
    """Where the record index disagrees with shard `number` as scanned: its chunks must be its records, in order,
    each spectrogram inside its record's data."""
    path, chunks = part.shard_paths[number], np.flatnonzero(part.chunk_shard == number)
    starts, ends = bounds[:-1], bounds[1:]
    if len(chunks) != len(starts):
        return [f"{path}: holds {len(starts)} records, record_index.npz lists {len(chunks)} chunks in it"]
    offsets = part.chunk_offset[chunks]
    inside = (offsets >= starts + RECORD_HEADER.size) & (offsets + chunk_bytes[chunks] <= ends - RECORD_FOOTER.size)
    return [
        f"{path}: record at byte {starts[k]}: record_index.npz puts chunk {chunks[k]}'s spectrogram at byte "
        f"{offsets[k]}, outside the record's data"
        for k in np.flatnonzero(~inside)
    ]


def dataset_problems(data_dir: str | Path, config_name: str, split_index: int) -> list[str]:
    """Everything wrong with a prepared dataset, one line each (empty when it is whole): every record's
    checksums, the record index against the shards and dataset_info.json, and the stored statistics and counts.
    A damaged record is named by its shard file and byte offset."""
    directory = layout.dataset_dir(data_dir, config_name, split_index)
    try:
        prepared = load_prepared(data_dir, config_name, split_index)
        info = json.loads((directory / "dataset_info.json").read_text(encoding="utf-8"))
        stored = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as error:
        return [f"{directory}: cannot be read: {error}"]
    problems = []
    shard_lengths = {split["name"]: [int(n) for n in split.get("shardLengths", [])] for split in info["splits"]}
    frame_bytes = math.prod(prepared.frame_shape) * STORED_DTYPE.itemsize
    for name, part in prepared.parts.items():
        chunk_bytes = _chunk_frames(part, prepared.chunk_frames) * frame_bytes
        if len(chunk_bytes) != len(part.chunk_offset):
            problems.append(
                f"{directory / layout.RECORD_INDEX_NAME}: {name} lists {len(part.chunk_offset)} chunks, its tracks' "
                f"frames make {len(chunk_bytes)}"
            )
            continue
        if shard_lengths.get(name, []) != [int((part.chunk_shard == n).sum()) for n in range(len(part.shard_paths))]:
            problems.append(f"{directory}: dataset_info.json and record_index.npz disagree on {name}'s shards")
        for number, path in enumerate(part.shard_paths):
            if not path.is_file():
                problems.append(f"{path}: missing (record_index.npz lists it)")
                continue
            bounds, damaged = scan_records(path)
            problems += damaged or _index_problems(part, number, bounds, chunk_bytes)
        listed, kept = set(prepared.tsv_track_ids[name]), set(part.track_ids)
        left_out = {record["track_id"] for record in prepared.missing(name)}
        if listed != kept | left_out or kept & left_out:
            problems.append(f"{directory}: {name}'s tracks and failures do not add up to its TSV's tracks")
    for statistic in ("mean", "std"):
        values, where = getattr(prepared, statistic), directory / "metadata.json"
        if values.shape != prepared.frame_shape:
            problems.append(f"{where}: {statistic} has shape {values.shape}, one frame's is {prepared.frame_shape}")
        elif not np.isfinite(values).all():
            problems.append(
                f"{where}: {statistic} is not finite in {(~np.isfinite(values)).sum()} of {values.size} bins"
            )
        elif statistic == "std" and not (values > 0).all():
            problems.append(f"{where}: std is 0 in {(values <= 0).sum()} bins, which normalising divides by")
    train_frames = int(prepared.parts["train"].frames.sum())
    if stored.get("num_train_frames") != train_frames:
        problems.append(
            f"{directory / 'metadata.json'}: num_train_frames {stored.get('num_train_frames')} but the training "
            f"tracks hold {train_frames} frames"
        )
    return problems


def prepared_datasets(data_dir: str | Path) -> list[tuple[str, int]]:
    """(feature setting, split) of every prepared dataset under a data dir, sorted."""
    found = Path(data_dir).glob(f"split-[0-9]*/{layout.DATASET_NAME}/*/{layout.VERSION}/{layout.RECORD_INDEX_NAME}")
    return sorted((path.parents[1].name, int(path.parents[3].name.removeprefix("split-"))) for path in found)
