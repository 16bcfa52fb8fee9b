"""Stage 1 of a build: parallel, resumable feature extraction into a per-track cache.

Each track's features are written as a float16 ``.npy`` (tmp file + ``os.replace``, so a file either is
complete or absent), then one JSON line records its outcome in the journal. A run killed at any point
and started again skips every track with a journal record and redoes the rest. Workers return only
small outcome records, never arrays, and at most ``workers + 1`` tracks are in flight, so memory is
bounded by the workers' largest tracks whatever the dataset size. A worker that dies (a decoder crash,
the OOM killer) does not end the run: the tracks it may have held are retried alone, and a track that
kills its worker alone goes to the failures report.

This module does not import TensorFlow, so that spawned workers start fast and light.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Generator, Iterable, Iterator

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
        """The cached float16 (n_mels, frames) features of one track."""
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


def _write_atomically(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def extract_track(job: TrackJob, input_root: Path, cache_root: Path, settings: features_lib.FeatureSettings) -> Outcome:
    """Computes and caches one track's features; every problem becomes a failure outcome, not an error."""
    source = Path(input_root) / job.path
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        return _failure(job, "missing", f"file not found: {source}")
    except OSError as error:
        return _failure(job, "unreadable", f"cannot read {source}: {error}")
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        values = features_lib.track_features(data, job.path, settings)
    except features_lib.AudioError as error:  # its message names the file
        return _failure(job, _failure_kind(str(error)), str(error), sha256)
    except ValueError as error:
        return _failure(job, _failure_kind(str(error)), f"{job.path}: {error}", sha256)
    except MemoryError:
        return _failure(job, "out_of_memory", f"{job.path}: out of memory computing its features", sha256)
    frames = values.shape[1]
    if frames < settings.min_frames:
        return _failure(job, "too_short", f"{frames} frames < minimum {settings.min_frames}", sha256)
    seconds = (frames - 1) * settings.hop_length / settings.sample_rate
    if seconds < job.duration * (1 - TRUNCATION_TOLERANCE_FRACTION) - TRUNCATION_TOLERANCE_S:
        return _failure(job, "truncated", f"decoded {seconds:.1f} s of the TSV's {job.duration:.1f} s", sha256)
    stored = values.astype(np.float16)
    if not np.isfinite(stored).all():
        return _failure(job, "overflow", "features exceed the float16 range", sha256)
    _write_atomically(Path(cache_root) / f"{job.track_id}.npy", stored)
    return Outcome(track_id=job.track_id, kind="ok", path=job.path, frames=frames, sha256=sha256)


_WORKER_STATE: dict = {}


def _init_worker(input_root: Path, cache_root: Path, settings: features_lib.FeatureSettings) -> None:
    """One BLAS/FFT thread per worker, so that ``workers`` = cores uses the machine without contention."""
    import threadpoolctl

    threadpoolctl.threadpool_limits(limits=1)
    _WORKER_STATE.update(input_root=input_root, cache_root=cache_root, settings=settings)


def _extract_in_worker(job: TrackJob) -> Outcome:
    try:
        return extract_track(job, _WORKER_STATE["input_root"], _WORKER_STATE["cache_root"], _WORKER_STATE["settings"])
    except Exception as error:  # noqa: BLE001  an unforeseen error costs one track, reported, not the run
        return _failure(job, "error", f"{type(error).__name__}: {error}")


def _executor(workers: int, input_root: Path, cache_root: Path, settings) -> concurrent.futures.ProcessPoolExecutor:
    # spawn: the parent may hold TensorFlow's threads, which fork would copy in a broken state.
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(input_root, cache_root, settings),
        max_tasks_per_child=500,  # returns a worker's memory after a long track, at little cost
    )


def _max_in_flight(workers: int) -> int:
    """One queued job beyond the running ones keeps every worker busy; more would only hold memory."""
    return workers + 1


def _run_pool(
    jobs: collections.deque[TrackJob], workers: int, input_root: Path, cache_root: Path, settings
) -> Generator[Outcome, None, list[TrackJob]]:
    """Yields outcomes of ``jobs`` (consumed from the left) until done or a worker dies; returns the jobs
    that were in flight when it died (the suspects), for the caller to run one by one."""
    in_flight: dict[concurrent.futures.Future, TrackJob] = {}
    with _executor(workers, input_root, cache_root, settings) as pool:
        while jobs or in_flight:
            while jobs and len(in_flight) < _max_in_flight(workers):
                job = jobs.popleft()
                in_flight[pool.submit(_extract_in_worker, job)] = job
            done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                job = in_flight.pop(future)
                try:
                    yield future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    return [job, *in_flight.values()]
    return []


def _isolated_outcome(job: TrackJob, input_root: Path, cache_root: Path, settings) -> Outcome:
    """Runs one suspect job alone in a fresh worker: if that worker dies too, the track is at fault."""
    with _executor(1, input_root, cache_root, settings) as pool:
        try:
            return pool.submit(_extract_in_worker, job).result()
        except concurrent.futures.process.BrokenProcessPool:
            return _failure(job, "worker_crash", "the extracting process died (decoder crash or out of memory)")


def _outcomes(jobs: list[TrackJob], workers: int, input_root: Path, cache_root: Path, settings) -> Iterator[Outcome]:
    queue = collections.deque(jobs)
    while queue:
        suspects = yield from _run_pool(queue, workers, input_root, cache_root, settings)
        if suspects:
            print(f"a worker died; retrying {len(suspects)} tracks one by one", file=sys.stderr)
        for job in suspects:
            yield _isolated_outcome(job, input_root, cache_root, settings)


def extract_all(
    jobs: Iterable[TrackJob],
    input_root: Path,
    cache: TrackCache,
    settings: features_lib.FeatureSettings,
    workers: int,
    *,
    retry_failed: bool = False,
    progress: bool = True,
) -> dict[str, Outcome]:
    """Outcome of every job, extracting only the tracks without a journal record (or failed ones, if asked)."""
    if workers < 1:
        raise ValueError(f"workers={workers}: need at least 1")
    jobs = list(jobs)
    cache.claim(settings)
    cache.tidy()
    done = cache.read_journal()
    todo = [job for job in jobs if job.track_id not in done or (retry_failed and not done[job.track_id].ok)]
    todo.sort(key=lambda job: -job.duration)  # long tracks first: the last worker finishes soon after the others
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
        for outcome in _outcomes(todo, workers, Path(input_root), cache.root, settings):
            cache.append(outcome)
            done[outcome.track_id] = outcome
            failed += not outcome.ok
            bar.update(round(durations[outcome.track_id]))
            bar.set_postfix(failed=failed, refresh=False)
    return {job.track_id: done[job.track_id] for job in jobs}
