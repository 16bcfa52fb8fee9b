"""Stage 1 of a build: parallel, resumable feature extraction into a per-track cache.

Each track's features are written as a float16 ``.npy`` (`files.write_atomically`: tmp file + ``os.replace``, so a
file either is complete or absent), then one JSON line records its outcome in the journal. A run killed at any point
and started again skips every track with a journal record and redoes the rest (a missing or unreadable file is looked
for again). The tracks run in the worker pool of `worker_pool`: workers return only small outcome records, never
arrays, and a track starts only while the estimated memory of the tracks in flight stays under a budget, so memory is
bounded whatever the dataset and the mix of track lengths. A worker that dies (a decoder crash, the OOM killer, a
kill) does not end the run nor hang it: the track it held is tried again alone, and a track that kills its worker
alone goes to the failures report; a worker that holds a track past its deadline (a hung decoder, a stalled network
filesystem) is killed and the track reported as `timeout`.

This module does not import TensorFlow, so that spawned workers start fast and light.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tqdm

from data_prep import features as features_lib
from data_prep import files, worker_pool
from data_prep.deadline import DEFAULT_DEADLINE, Deadline
from data_prep.reader import stored_frames

JOURNAL_NAME = "journal.jsonl"
SETTINGS_NAME = "settings.json"
# A cache file holds a track's features as its shards store them (`reader.time_major`), so that stage 2 copies each
# chunk's bytes as they are; the settings file records it.
CACHE_LAYOUT = "time_major"
# A decoded track may be this much shorter than its TSV duration (MP3 padding, rounding) before it is
# reported as truncated.
TRUNCATION_TOLERANCE_S = 1.0
TRUNCATION_TOLERANCE_FRACTION = 0.02
# A write that fails with one of `files.DISK_FULL_ERRNOS` stops the build (a full disk or a file-size limit): it is
# not the track's fault, so the track is not journaled as failed, and a rerun once there is space goes on from the
# cache.
# The outcome a worker returns when it cannot write a track's features for want of space; never journaled.
NO_SPACE = "no_space"


@dataclasses.dataclass(frozen=True)
class TrackJob:
    """What a worker needs to extract one track."""

    track_id: str
    path: str  # input file relative to the input root
    duration: float  # seconds, from the TSV


# What a worker's memory grows by over one track beside the values it buffers (`track_memory`): decode blocks, FFT and
# projection buffers, the cache writer's gathered frames. Measured as the growth of a fresh worker's peak resident
# memory over one 44.1 kHz stereo MP3 after a warm-up track (`python -m benchmarks.preparation_memory --audio`,
# 2026-12-07): hop512 75 MiB for 4 min (values 81 MiB), 198 MiB for 10 min (202), 250 MiB for 20 and 40 min (the
# 256-MiB cap); hop512_stereo 151 MiB for 4 min (162), 237 MiB for 20 min.
TRACK_BYTES_FIXED = 32 * 2**20
# An .npy input is held as read, as float32 values and as float16: bytes per value.
NPY_BYTES_PER_VALUE = 10


def track_memory(job: TrackJob, settings: features_lib.FeatureSettings) -> int:
    """The estimated peak bytes a worker needs to extract `job`'s features: what it buffers until the track's peak is
    known (`features.FileFeatures`: the spectrogram values of every signal, at most `features.PEAK_BUFFER_BYTES`,
    beyond which the file is decoded twice), or a whole .npy input, plus `TRACK_BYTES_FIXED`."""
    frames_per_second = settings.sample_rate / settings.hop_length
    if settings.source == "npy":
        return TRACK_BYTES_FIXED + int(NPY_BYTES_PER_VALUE * settings.n_mels * frames_per_second * job.duration)
    values = settings.n_fft // 2 + 1 if settings.order == "weighted_db_then_mel" else settings.n_mels
    buffered = 4 * values * settings.channels * frames_per_second * job.duration  # float32
    return TRACK_BYTES_FIXED + int(min(buffered, features_lib.PEAK_BUFFER_BYTES))


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One journal record: the track is cached (``kind == "ok"``) or failed with a reason."""

    track_id: str
    kind: str  # "ok", or a failure kind such as "missing", "corrupt", "too_short"
    path: str
    reason: str = ""
    frames: int = 0
    sha256: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


class TrackCache:
    """A directory of ``<track_id>.npy`` float16 features and the journal of outcomes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def journal_path(self) -> Path:
        return self.root / JOURNAL_NAME

    def feature_path(self, track_id: str) -> Path:
        return self.root / f"{track_id}.npy"

    def load(self, track_id: str) -> np.ndarray:
        """The cached float16 features of one track in the shards' layout (`reader.time_major`): (frames, n_mels), or
        (frames, channels, n_mels) stereo."""
        return np.load(self.feature_path(track_id), allow_pickle=False)

    def frame_count(self, track_id: str) -> int:
        """The frames of one track's cached features, from the file's header."""
        return np.load(self.feature_path(track_id), mmap_mode="r").shape[0]

    def frame_blocks(self, track_id: str, block_frames: int) -> Iterator[np.ndarray]:
        """The cached features of one track as in `load`, in blocks of at most `block_frames` frames (the last one
        shorter), so that memory holds one block whatever the track's length: each, one contiguous byte range of the
        file, is copied out of a mapping of the file that is closed again at once, so that no more than a block of
        the file stays in this process's memory."""
        path = self.feature_path(track_id)
        for start in range(0, self.frame_count(track_id), block_frames):
            mapped = np.load(path, mmap_mode="r")
            block = np.array(mapped[start : start + block_frames])
            del mapped  # unmapped: its pages leave this process's resident memory
            yield block

    def read_journal(self) -> dict[str, Outcome]:
        """Last outcome per track; a torn last line (killed mid-write) and vanished files are ignored."""
        outcomes: dict[str, Outcome] = {}
        if not self.journal_path.exists():
            return outcomes
        with self.journal_path.open(encoding="utf-8") as journal:
            for line in journal:
                try:
                    outcome = Outcome(**json.loads(line))
                except (ValueError, TypeError):
                    continue
                if outcome.ok and not self.feature_path(outcome.track_id).exists():
                    continue
                outcomes[outcome.track_id] = outcome
        return outcomes

    def claim(self, settings: features_lib.FeatureSettings) -> None:
        """Records the settings and layout of a new cache, or checks that an existing one was made with the same."""
        self.root.mkdir(parents=True, exist_ok=True)
        recorded = self.root / SETTINGS_NAME
        description = {**settings.to_dict(), "layout": CACHE_LAYOUT}
        if not recorded.exists():
            recorded.write_text(json.dumps(description, indent=1), encoding="utf-8")
        elif json.loads(recorded.read_text(encoding="utf-8")) != description:
            raise ValueError(
                f"the feature cache {self.root} was made with other settings or in another layout ({recorded}); "
                "delete it or choose another cache dir"
            )

    def tidy(self) -> None:
        """Ends a torn last journal line and removes half-written feature files: a killed run's, when the next
        starts, and those of the workers a run stops mid-track when it ends early (a full disk, Ctrl-C)."""
        journal = self.journal_path.read_bytes() if self.journal_path.exists() else b""
        if journal and not journal.endswith(b"\n"):
            with self.journal_path.open("a", encoding="utf-8") as ending:
                ending.write("\n")
        for partial in self.root.glob(".*.tmp.npy"):
            partial.unlink()

    def append(self, outcome: Outcome) -> None:
        """Adds one record; the file is closed (flushed) so that a killed run keeps every finished track."""
        with self.journal_path.open("a", encoding="utf-8") as journal:
            journal.write(json.dumps(dataclasses.asdict(outcome)) + "\n")


def _failure(job: TrackJob, kind: str, reason: str, sha256: str = "") -> Outcome:
    return Outcome(track_id=job.track_id, kind=kind, path=job.path, reason=reason, sha256=sha256)


def _failure_kind(reason: str) -> str:
    """A short category of a features error, for the summary's counts per reason."""
    for marker, kind in (
        ("empty", "empty"),
        ("no audio samples", "empty"),
        ("samples: need more", "too_short"),
        ("sample rate", "sample_rate"),
        ("channel count", "channels"),
        ("has shape", "bad_shape"),
        ("non-finite", "non_finite"),
    ):
        if marker in reason:
            return kind
    return "corrupt"


def extract_track(
    job: TrackJob, input_root: Path, cache_root: Path, settings: features_lib.FeatureSettings, resample: bool = False
) -> Outcome:
    """Computes and caches one track's features; every problem becomes a failure outcome, not an error.
    `resample`: other sample rates and channel counts are resampled and mixed down instead of failing."""
    source = Path(input_root) / job.path
    try:
        if settings.source == "npy":
            data = source.read_bytes()
            sha256 = hashlib.sha256(data).hexdigest()
        else:
            sha256 = _file_sha256(source)
    except FileNotFoundError:
        return _failure(job, "missing", f"file not found: {source}")
    except OSError as error:
        return _failure(job, "unreadable", f"cannot read {source}: {error}")
    target = Path(cache_root) / f"{job.track_id}.npy"
    try:
        if settings.source == "npy":
            values = features_lib.track_features(data, job.path, settings, resample=resample)
            return _cache(job, settings, values.shape[-1], [values], target, sha256)
        try:
            audio = features_lib.AudioFile(source, job.path)
        except OSError as error:  # gone or locked since it was hashed
            return _failure(job, "unreadable", f"cannot read {source}: {error}", sha256)
        with audio:
            computed = features_lib.FileFeatures(audio, settings, resample=resample)
            return _cache(job, settings, computed.measure(), computed.blocks(), target, sha256)
    except features_lib.AudioError as error:  # its message names the file
        return _failure(job, _failure_kind(str(error)), str(error), sha256)
    except ValueError as error:
        return _failure(job, _failure_kind(str(error)), f"{job.path}: {error}", sha256)
    except MemoryError:
        return _failure(job, "out_of_memory", f"{job.path}: out of memory computing its features", sha256)


# Bytes read at a time to hash a track's file.
_HASH_BLOCK_BYTES = 2**20


def _file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in blocks (a three-hour MP3 is 400 MB at 320 kbit/s)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _cache(
    job: TrackJob,
    settings: features_lib.FeatureSettings,
    frames: int,
    blocks: Iterable[np.ndarray],
    target: Path,
    sha256: str,
) -> Outcome:
    """Checks a track of `frames` frames against its TSV duration and the setting's minimum, then writes its features
    (given in `blocks` of frames) to the cache as float16: its outcome."""
    seconds = (frames - 1) * settings.hop_length / settings.sample_rate
    # Much less audio than the TSV says is a damaged or cut file, even when what is left is also too short.
    if seconds < job.duration * (1 - TRUNCATION_TOLERANCE_FRACTION) - TRUNCATION_TOLERANCE_S:
        return _failure(job, "truncated", f"decoded {seconds:.1f} s of the TSV's {job.duration:.1f} s", sha256)
    if frames < settings.min_frames:
        return _failure(job, "too_short", f"{frames} frames < minimum {settings.min_frames}", sha256)
    shape = (frames, *settings.frame_shape)
    try:
        if not _write_features(target, shape, blocks):
            return _failure(job, "overflow", "features exceed the float16 range", sha256)
    except OSError as error:
        if error.errno not in files.DISK_FULL_ERRNOS:
            raise
        return _failure(job, NO_SPACE, f"cannot write {target}: {error.strerror}", sha256)
    return Outcome(track_id=job.track_id, kind="ok", path=job.path, frames=frames, sha256=sha256)


def _write_features(target: Path, shape: tuple[int, ...], blocks: Iterable[np.ndarray]) -> bool:
    """Writes features given in blocks of frames as computed, (..., n_mels, frames), as the float16 .npy `target` of
    `shape` in the shards' layout (`reader.time_major`, frames first): byte for byte what `np.save` writes of the
    whole track's time-major float16 values; memory holds one block, whatever the track's length. False, and no file,
    when a value exceeds the float16 range.

    Each block is cast into a time-major float16 buffer (`reader.stored_frames`) and appended to a temporary file
    that is renamed into place once whole, as `files.write_atomically` does (a file there is whole): on an error or an
    overflow the temporary file is removed, and one that a killed worker leaves is removed by the next run
    (`TrackCache.tidy`)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f2", "fortran_order": False, "shape": shape})
    temporary = target.with_name(f".{target.stem}.{os.getpid()}.tmp.npy")
    try:
        with temporary.open("wb") as out:
            out.write(header.getvalue())
            written = 0
            for block in blocks:
                # Rounding to float16 keeps the order of magnitudes: the block fits if its largest magnitude does.
                if block.size and not np.isfinite(np.abs(block).max().astype(np.float16)):
                    temporary.unlink()
                    return False
                stored = stored_frames(block)
                out.write(stored.data)
                written += len(stored)
            if written != shape[0]:
                raise RuntimeError(f"{written} frames of features computed for {target}, {shape[0]} announced")
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return True


# Outcomes that a rerun can mend without --retry_failed: the file is looked for again on every run.
RELOOKED_KINDS = frozenset({"missing", "unreadable"})
# Outcomes that a run with resampling mends: it extracts them again.
RESAMPLED_KINDS = frozenset({"sample_rate", "channels"})


def extract_all(
    jobs: Iterable[TrackJob],
    input_root: Path,
    cache: TrackCache,
    settings: features_lib.FeatureSettings,
    workers: int,
    *,
    retry_failed: bool = False,
    progress: bool = True,
    memory_budget_gb: float = worker_pool.DEFAULT_MEMORY_BUDGET_GB,
    tracks_per_worker: int = worker_pool.DEFAULT_TRACKS_PER_WORKER,
    resample: bool = False,
    deadline: Deadline = DEFAULT_DEADLINE,
) -> dict[str, Outcome]:
    """Outcome of every job, extracting the tracks without a journal record, those whose file was missing or
    unreadable last time (looked for again on every run), and failed ones if asked. With `resample`, other sample
    rates and channel counts are resampled and mixed down (tracks that failed for them last time are redone).

    Workers' memory stays under `memory_budget_gb` by the tracks' estimated needs (`track_memory`), except for a
    single track larger than the budget, which runs alone. A track that overruns its `deadline` is a `timeout`
    failure. OSError(ENOSPC) when a track's features cannot be written for want of space (`files.DISK_FULL_ERRNOS`):
    the tracks finished before it stay in the cache.
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: need at least 1")
    if memory_budget_gb <= 0 or tracks_per_worker < 1:
        raise ValueError(
            f"memory_budget_gb={memory_budget_gb} and tracks_per_worker={tracks_per_worker} must be positive"
        )
    jobs = list(jobs)
    cache.claim(settings)
    cache.tidy()
    done = cache.read_journal()
    redone = RELOOKED_KINDS | (RESAMPLED_KINDS if resample else frozenset())
    todo = [
        job
        for job in jobs
        if job.track_id not in done or done[job.track_id].kind in redone or (retry_failed and not done[job.track_id].ok)
    ]
    bar = tqdm.tqdm(
        total=round(sum(job.duration for job in todo)),
        unit="s",
        unit_scale=True,
        desc=f"features ({len(jobs) - len(todo)} of {len(jobs)} tracks cached)",
        disable=not progress,
    )
    durations = {job.track_id: job.duration for job in todo}
    failed = 0
    with bar:
        task = functools.partial(
            extract_track, input_root=Path(input_root), cache_root=cache.root, settings=settings, resample=resample
        )
        results = worker_pool.run_jobs(
            task,
            todo,
            workers,
            memory_budget=int(memory_budget_gb * 2**30),
            memory=functools.partial(track_memory, settings=settings),
            jobs_per_worker=tracks_per_worker,
            deadline=deadline,
        )
        try:
            for job, result in results:
                outcome = result
                if isinstance(result, worker_pool.Failed):
                    retry = "; --retry_failed tries it again" if result.kind == "timeout" else ""
                    outcome = _failure(job, result.kind, result.reason + retry)
                if outcome.kind == NO_SPACE:
                    raise OSError(errno.ENOSPC, outcome.reason)
                cache.append(outcome)
                done[outcome.track_id] = outcome
                failed += not outcome.ok
                bar.update(round(durations[outcome.track_id]))
                bar.set_postfix(failed=failed, refresh=False)
        finally:
            results.close()  # its workers are stopped, killed mid-track when the run ends early
            cache.tidy()
    return {job.track_id: done[job.track_id] for job in jobs}
