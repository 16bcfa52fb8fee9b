"""Stage 1 of a build: parallel, resumable feature extraction into a per-track cache.

Each track's features are written as a float16 ``.npy`` (tmp file + ``os.replace``, so a file either is
complete or absent), then one JSON line records its outcome in the journal. A run killed at any point
and started again skips every track with a journal record and redoes the rest (a missing or unreadable
file is looked for again). Workers return only small outcome records, never arrays, and a track starts
only while the estimated memory of the tracks in flight stays under a budget, so memory is bounded
whatever the dataset and the mix of track lengths. A worker that dies (a decoder crash, the OOM killer, a
kill) does not end the run nor hang it: the track it held is tried again alone, and a track that kills its
worker alone goes to the failures report.

This module does not import TensorFlow, so that spawned workers start fast and light.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tqdm

from data_prep import features as features_lib

JOURNAL_NAME = "journal.jsonl"
SETTINGS_NAME = "settings.json"
# A decoded track may be this much shorter than its TSV duration (MP3 padding, rounding) before it is
# reported as truncated.
TRUNCATION_TOLERANCE_S = 1.0
TRUNCATION_TOLERANCE_FRACTION = 0.02


@dataclasses.dataclass(frozen=True)
class TrackJob:
    """What a worker needs to extract one track."""

    track_id: str
    path: str  # input file relative to the input root
    duration: float  # seconds, from the TSV


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
        """The cached float16 features of one track: (n_mels, frames), or (channels, n_mels, frames) stereo."""
        return np.load(self.feature_path(track_id), allow_pickle=False)

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
        """Records the settings of a new cache, or checks that an existing one was made with the same."""
        self.root.mkdir(parents=True, exist_ok=True)
        recorded = self.root / SETTINGS_NAME
        if not recorded.exists():
            recorded.write_text(json.dumps(settings.to_dict(), indent=1), encoding="utf-8")
        elif json.loads(recorded.read_text(encoding="utf-8")) != settings.to_dict():
            raise ValueError(
                f"the feature cache {self.root} was made with other settings ({recorded}); "
                "delete it or choose another cache dir"
            )

    def tidy(self) -> None:
        """After a killed run: ends a torn last journal line and removes half-written feature files."""
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
    ):
        if marker in reason:
            return kind
    return "corrupt"


def write_atomically(path: Path, array: np.ndarray) -> None:
    """Saves `array` as `path` (.npy) via a temporary file: a file there is always whole."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def extract_track(
    job: TrackJob, input_root: Path, cache_root: Path, settings: features_lib.FeatureSettings, resample: bool = False
) -> Outcome:
    """Computes and caches one track's features; every problem becomes a failure outcome, not an error.
    `resample`: other sample rates and channel counts are resampled and mixed down instead of failing."""
    source = Path(input_root) / job.path
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        return _failure(job, "missing", f"file not found: {source}")
    except OSError as error:
        return _failure(job, "unreadable", f"cannot read {source}: {error}")
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        values = features_lib.track_features(data, job.path, settings, resample=resample)
    except features_lib.AudioError as error:  # its message names the file
        return _failure(job, _failure_kind(str(error)), str(error), sha256)
    except ValueError as error:
        return _failure(job, _failure_kind(str(error)), f"{job.path}: {error}", sha256)
    except MemoryError:
        return _failure(job, "out_of_memory", f"{job.path}: out of memory computing its features", sha256)
    frames = values.shape[-1]
    if frames < settings.min_frames:
        return _failure(job, "too_short", f"{frames} frames < minimum {settings.min_frames}", sha256)
    seconds = (frames - 1) * settings.hop_length / settings.sample_rate
    if seconds < job.duration * (1 - TRUNCATION_TOLERANCE_FRACTION) - TRUNCATION_TOLERANCE_S:
        return _failure(job, "truncated", f"decoded {seconds:.1f} s of the TSV's {job.duration:.1f} s", sha256)
    stored = values.astype(np.float16)
    if not np.isfinite(stored).all():
        return _failure(job, "overflow", "features exceed the float16 range", sha256)
    write_atomically(Path(cache_root) / f"{job.track_id}.npy", stored)
    return Outcome(track_id=job.track_id, kind="ok", path=job.path, frames=frames, sha256=sha256)


# Peak memory of a worker per second of audio (hop512 from a 44.1 kHz stereo MP3: the encoded bytes, the decoded
# float32 stereo waveform, its mono mix and padded copy, the float32 power spectrogram, the mel output and its
# copies), measured as the growth of the peak RSS of a fresh process over one track: 1.20 MB/s for a 708-s track,
# 1.74 MB/s for a 31-s one; 1.25 MB/s is kept above the long-track figure, plus a fixed part for short tracks.
WORKER_BYTES_PER_SECOND = 1_250_000
# A stereo setting's worker keeps the first channel's features while it computes the second's, and stacks both:
# 1.43 MB/s measured the same way on a 300-s stereo MP3 (1.25 MB/s for the mono setting on the same file).
WORKER_BYTES_PER_SECOND_STEREO = 1_450_000
WORKER_BYTES_PER_TRACK = 32 * 2**20
DEFAULT_MEMORY_BUDGET_GB = 8.0
# A worker is replaced after this many tracks, so that a long-lived process cannot accumulate memory.
DEFAULT_TRACKS_PER_WORKER = 200
# Outcomes that a rerun can mend without --retry_failed: the file is looked for again on every run.
RELOOKED_KINDS = frozenset({"missing", "unreadable"})
# Outcomes that a run with resampling mends: it extracts them again.
RESAMPLED_KINDS = frozenset({"sample_rate", "channels"})


def job_memory(job: TrackJob, channels: int = 1) -> int:
    """The estimated peak bytes of a worker extracting `job` with features of `channels` channels (see
    WORKER_BYTES_PER_SECOND)."""
    per_second = WORKER_BYTES_PER_SECOND if channels == 1 else WORKER_BYTES_PER_SECOND_STEREO
    return WORKER_BYTES_PER_TRACK + int(per_second * job.duration)


def _worker_main(
    connection, input_root: Path, cache_root: Path, settings: features_lib.FeatureSettings, resample: bool
) -> None:
    """A worker: one BLAS/FFT thread; extracts each job it receives and sends back its outcome, until it gets
    None or its parent is gone (the pipe's end of file), so a killed build leaves no worker behind."""
    import threadpoolctl

    threadpoolctl.threadpool_limits(limits=1)
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            outcome = extract_track(job, input_root, cache_root, settings, resample)
        except Exception as error:
            outcome = _failure(job, "error", f"{type(error).__name__}: {error}")
        connection.send(outcome)


@dataclasses.dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    connection: multiprocessing.connection.Connection
    job: TrackJob | None = None  # the track it holds, if any
    done: int = 0  # tracks it has finished


class _Pool:
    """Worker processes that the parent drives one job at a time, each over its own pipe.

    The parent always knows which track each worker holds, waits on the workers' pipes and process sentinels
    together, and never waits for a worker that may hang: a dead worker is noticed at once and replaced, a
    retiring one is asked to stop and killed if it does not. (concurrent.futures' pool can hang for good when a
    worker dies or retires; see docs/architecture.md, "Prepared data".)
    """

    def __init__(self, size: int, input_root: Path, cache_root: Path, settings, tracks_per_worker: int, resample: bool):
        self._context = multiprocessing.get_context("spawn")  # the parent may hold threads that fork would copy
        self._args = (input_root, cache_root, settings, resample)
        self._tracks_per_worker = tracks_per_worker
        self.workers = [self._start() for _ in range(size)]

    def _start(self) -> _Worker:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(child_end, *self._args), daemon=True)
        process.start()
        child_end.close()
        return _Worker(process, parent_end)

    def replace(self, worker: _Worker) -> None:
        """Stops a worker (killing it if it does not stop at once) and starts a fresh one in its place."""
        with contextlib.suppress(OSError):
            worker.connection.send(None)
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.connection.close()
        self.workers[self.workers.index(worker)] = self._start()

    def submit(self, worker: _Worker, job: TrackJob) -> bool:
        """Hands `job` to an idle worker; False if the worker turned out to be dead."""
        worker.job = job
        try:
            worker.connection.send(job)
        except OSError:
            return False
        return True

    def wait(self) -> tuple[list[tuple[TrackJob, Outcome]], list[_Worker]]:
        """Blocks until a busy worker answers or any worker dies: (finished (job, outcome) pairs, dead workers).

        A dead worker's `job` is the track it held (None if it held none). Finished workers are free again, and
        replaced here once they have done their share of tracks.
        """
        busy = [worker for worker in self.workers if worker.job is not None]
        ready = set(
            multiprocessing.connection.wait([w.connection for w in busy] + [w.process.sentinel for w in self.workers])
        )
        finished, dead = [], []
        for worker in list(self.workers):
            if worker.job is not None and worker.connection in ready:
                try:
                    outcome = worker.connection.recv()
                except (EOFError, OSError):
                    dead.append(worker)
                    continue
                finished.append((worker.job, outcome))
                worker.job, worker.done = None, worker.done + 1
                if worker.done >= self._tracks_per_worker:
                    self.replace(worker)
            elif worker.process.sentinel in ready:
                dead.append(worker)
        return finished, dead

    def close(self) -> None:
        for worker in self.workers:
            worker.process.kill()
            worker.process.join()
            worker.connection.close()


class _Schedule:
    """Which pending track to start next: the longest whose estimated memory fits the budget beside the tracks in
    flight, or the longest of all when none is in flight (so that one larger than the budget runs, alone). Long
    tracks start early, which keeps every worker busy to the end, but never more of them than the budget holds."""

    def __init__(self, jobs: Iterable[TrackJob], memory_budget: int, channels: int = 1):
        self.memory = functools.partial(job_memory, channels=channels)  # a job's estimated bytes
        self._jobs = sorted(jobs, key=lambda job: (self.memory(job), job.track_id))
        self._memory = [self.memory(job) for job in self._jobs]
        self.memory_budget = memory_budget
        self.in_flight = 0  # estimated bytes of the tracks being extracted

    def __len__(self) -> int:
        return len(self._jobs)

    def take(self) -> TrackJob | None:
        if not self._jobs:
            return None
        if self.in_flight:
            index = bisect.bisect_right(self._memory, self.memory_budget - self.in_flight) - 1
            if index < 0:
                return None
        else:
            index = len(self._jobs) - 1
        self._memory.pop(index)
        job = self._jobs.pop(index)
        self.in_flight += self.memory(job)
        return job

    def finished(self, job: TrackJob) -> None:
        self.in_flight -= self.memory(job)


def _outcomes(
    jobs: list[TrackJob],
    workers: int,
    input_root: Path,
    cache_root: Path,
    settings,
    memory_budget: int,
    tracks_per_worker: int,
    resample: bool,
) -> Iterator[Outcome]:
    """Outcomes of `jobs` in completion order. A track whose worker dies is tried once more alone (no other track
    in flight, in a fresh worker); if that worker dies too, the track is reported as `worker_crash`."""
    schedule = _Schedule(jobs, memory_budget, settings.channels)
    suspects: collections.deque[TrackJob] = collections.deque()
    retried: set[str] = set()
    pool = _Pool(min(workers, len(jobs)), input_root, cache_root, settings, tracks_per_worker, resample)
    try:
        while len(schedule) or suspects or any(worker.job for worker in pool.workers):
            for worker in pool.workers:
                if worker.job is not None:
                    continue
                alone = not any(w.job for w in pool.workers)
                if suspects:
                    job = suspects.popleft() if alone else None
                    schedule.in_flight += schedule.memory(job) if job else 0
                elif any(w.job and w.job.track_id in retried for w in pool.workers):
                    job = None  # a suspect runs alone
                else:
                    job = schedule.take()
                if job is None:
                    break
                if not pool.submit(worker, job):
                    break  # its death is noticed by wait()
            finished, dead = pool.wait()
            for job, outcome in finished:
                schedule.finished(job)
                yield outcome
            for worker in dead:
                job = worker.job
                pool.replace(worker)
                if job is None:
                    continue
                schedule.finished(job)
                if job.track_id in retried:
                    yield _failure(job, "worker_crash", "the extracting process died (decoder crash or out of memory)")
                else:
                    print(f"a worker died holding {job.track_id}; trying it again alone", file=sys.stderr)
                    retried.add(job.track_id)
                    suspects.append(job)
    finally:
        pool.close()


def extract_all(
    jobs: Iterable[TrackJob],
    input_root: Path,
    cache: TrackCache,
    settings: features_lib.FeatureSettings,
    workers: int,
    *,
    retry_failed: bool = False,
    progress: bool = True,
    memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB,
    tracks_per_worker: int = DEFAULT_TRACKS_PER_WORKER,
    resample: bool = False,
) -> dict[str, Outcome]:
    """Outcome of every job, extracting the tracks without a journal record, those whose file was missing or
    unreadable last time (looked for again on every run), and failed ones if asked. With `resample`, other sample
    rates and channel counts are resampled and mixed down (tracks that failed for them last time are redone).

    Workers' memory stays under `memory_budget_gb` by the tracks' estimated needs (`job_memory`), except for a
    single track larger than the budget, which runs alone.
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
        for outcome in _outcomes(
            todo,
            workers,
            Path(input_root),
            cache.root,
            settings,
            int(memory_budget_gb * 2**30),
            tracks_per_worker,
            resample,
        ):
            cache.append(outcome)
            done[outcome.track_id] = outcome
            failed += not outcome.ok
            bar.update(round(durations[outcome.track_id]))
            bar.set_postfix(failed=failed, refresh=False)
    return {job.track_id: done[job.track_id] for job in jobs}
