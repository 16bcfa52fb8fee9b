"""A pool of worker processes over pipes that cannot hang: it runs one job per track of data preparation
(feature extraction in `extract`, rendering in `synthetic`, the organisers-style spectrograms of `essentia_like`).

Why not concurrent.futures: its pool ends the whole run when a worker dies, and can hang for good when one hangs or
retires. Here the parent drives each worker one job at a time over its own pipe (`_Pool`), so it always knows which
track a worker holds and never waits for one that may hang:

- A worker that dies (a decoder crash, the OOM killer, a kill) does not end the run nor hang it: the track it held is
  tried again alone, in a fresh worker, and a track that kills its worker alone gets a `Failed("worker_crash")`.
- A worker that holds a track past its deadline (`data_prep.deadline`: a hung decoder, a stalled network filesystem) is
  killed and replaced, and the track gets a `Failed("timeout")`.
- A job whose task raises gets a `Failed("error")` naming the exception; the worker goes on with the next.
- Tracks start longest first, but only while the estimated memory of the tracks in flight (the caller's `memory` of
  a job: `extract.track_memory` for feature extraction) stays under a budget (`_Schedule`), so memory is bounded
  whatever the dataset and the mix of track lengths, and long tracks do not finish alone at the end. Workers should
  return only small records, never arrays.

`run_jobs` yields every job's result (or its `Failed`) in completion order; `run_all` runs them all and then raises
`JobsFailed` naming those that failed: one bad track neither stops the others nor hangs the run.

This module does not import TensorFlow, so that spawned workers start fast and light.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import tqdm

from data_prep.deadline import DEFAULT_DEADLINE, Deadline

DEFAULT_MEMORY_BUDGET_GB = 8.0
# A worker is replaced after this many tracks, so that a long-lived process cannot accumulate memory.
DEFAULT_TRACKS_PER_WORKER = 200


class Job(Protocol):
    """What the worker pool schedules: a track with an id and its length in seconds."""

    @property
    def track_id(self) -> str: ...

    @property
    def duration(self) -> float: ...


def _no_memory(job: Job) -> int:
    """Without a memory budget, jobs are ordered by length alone."""
    return 0


@dataclasses.dataclass(frozen=True)
class Failed:
    """A job without a result: its task raised, its worker died twice over it, or it overran its deadline."""

    kind: str  # "error", "worker_crash" or "timeout"
    reason: str


def _worker_main(connection, task: Callable[[Job], object]) -> None:
    """A worker: one BLAS/FFT thread; runs `task` on each job it receives and sends back its result (a `Failed` if
    the task raised), until it gets None or its parent is gone (the pipe's end of file), so a killed run leaves no
    worker behind."""
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
            result = task(job)
        except Exception as error:
            result = Failed("error", f"{type(error).__name__}: {error}")
        connection.send(result)


@dataclasses.dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    connection: multiprocessing.connection.Connection
    job: Job | None = None  # the track it holds, if any
    deadline: float = math.inf  # time.monotonic() by which it must answer for its job
    done: int = 0  # tracks it has finished


class _Pool:
    """Worker processes that the parent drives one job at a time, each over its own pipe.

    The parent always knows which track each worker holds, waits on the workers' pipes and process sentinels
    together, and never waits for a worker that may hang: a dead worker is noticed at once and replaced, one past
    its track's deadline is killed and replaced, a retiring one is asked to stop and killed if it does not.
    (concurrent.futures' pool ends the whole run when a worker dies, and can hang for good when one hangs or
    retires; see docs/architecture.md, "Prepared data".)
    """

    def __init__(self, size: int, task: Callable[[Job], object], jobs_per_worker: int):
        self._context = multiprocessing.get_context("spawn")  # the parent may hold threads that fork would copy
        self._task = task
        self._jobs_per_worker = jobs_per_worker
        self.workers = [self._start() for _ in range(size)]

    def _start(self) -> _Worker:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(child_end, self._task), daemon=True)
        process.start()
        child_end.close()
        return _Worker(process, parent_end)

    def replace(self, worker: _Worker, kill: bool = False) -> None:
        """Stops a worker (killing it if it does not stop at once, or at once with `kill`) and starts a fresh one
        in its place."""
        if not kill:
            with contextlib.suppress(OSError):
                worker.connection.send(None)
            worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.connection.close()
        self.workers[self.workers.index(worker)] = self._start()

    def submit(self, worker: _Worker, job: Job, seconds: float) -> bool:
        """Hands `job` to an idle worker, to be answered within `seconds`; False if the worker turned out dead."""
        worker.job, worker.deadline = job, time.monotonic() + seconds
        try:
            worker.connection.send(job)
        except OSError:
            return False
        return True

    def wait(self) -> tuple[list[tuple[Job, object]], list[_Worker], list[_Worker]]:
        """Blocks until a busy worker answers, any worker dies or a busy one passes its deadline: (finished (job,
        result) pairs, dead workers, overdue workers).

        A dead or overdue worker's `job` is the track it held (None if it held none). Finished workers are free
        again, and replaced here once they have done their share of tracks.
        """
        busy = [worker for worker in self.workers if worker.job is not None]
        timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic()) if busy else None
        ready = set(
            multiprocessing.connection.wait(
                [w.connection for w in busy] + [w.process.sentinel for w in self.workers], timeout
            )
        )
        finished, dead, overdue = [], [], []
        for worker in list(self.workers):
            if worker.job is not None and worker.connection in ready:
                try:
                    result = worker.connection.recv()
                except (EOFError, OSError):
                    dead.append(worker)
                    continue
                finished.append((worker.job, result))
                worker.job, worker.done = None, worker.done + 1
                if worker.done >= self._jobs_per_worker:
                    self.replace(worker)
            elif worker.process.sentinel in ready:
                dead.append(worker)
            elif worker.job is not None and time.monotonic() >= worker.deadline:
                overdue.append(worker)
        return finished, dead, overdue

    def close(self) -> None:
        for worker in self.workers:
            worker.process.kill()
            worker.process.join()
            worker.connection.close()


class _Schedule:
    """Which pending track to start next: the longest whose estimated memory (`memory(job)`, bytes) fits the budget
    beside the tracks in flight, or the longest of all when none is in flight (so that one larger than the budget
    runs, alone). Long tracks start early, which keeps every worker busy to the end, but never more of them than the
    budget holds."""

    def __init__(self, jobs: Iterable[Job], memory_budget: int, memory: Callable[[Job], int] = _no_memory):
        self.memory = memory
        self._jobs = sorted(jobs, key=lambda job: (self.memory(job), job.duration, job.track_id))
        self._memory = [self.memory(job) for job in self._jobs]
        self.memory_budget = memory_budget
        self.in_flight = 0  # estimated bytes of the tracks being extracted

    def __len__(self) -> int:
        return len(self._jobs)

    def take(self) -> Job | None:
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

    def finished(self, job: Job) -> None:
        self.in_flight -= self.memory(job)


def run_jobs(
    task: Callable[[Job], object],
    jobs: Iterable[Job],
    workers: int,
    *,
    memory_budget: int = sys.maxsize,
    memory: Callable[[Job], int] = _no_memory,
    jobs_per_worker: int = DEFAULT_TRACKS_PER_WORKER,
    deadline: Deadline = DEFAULT_DEADLINE,
) -> Iterator[tuple[Job, object]]:
    """(job, result) of every job, in completion order: `task(job)` run in worker processes (`task` must be
    picklable: a module-level function or a `functools.partial` of one), longest tracks first within the memory
    budget by each job's estimated bytes, `memory(job)` (`_Schedule`).

    No job can end the run or hang it: a job whose task raises, whose worker dies twice (it is tried once more
    alone, in a fresh worker), or that overruns its `deadline` (its worker is killed) gets a `Failed` result.
    """
    jobs = list(jobs)
    if not jobs:
        return
    schedule = _Schedule(jobs, memory_budget, memory)
    suspects: collections.deque[Job] = collections.deque()
    retried: set[str] = set()
    pool = _Pool(min(workers, len(jobs)), task, jobs_per_worker)
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
                if not pool.submit(worker, job, deadline.seconds(job.duration)):
                    break  # its death is noticed by wait()
            finished, dead, overdue = pool.wait()
            for job, result in finished:
                schedule.finished(job)
                yield job, result
            for worker in overdue:
                job = worker.job
                pool.replace(worker, kill=True)
                schedule.finished(job)
                yield (
                    job,
                    Failed(
                        "timeout",
                        f"no result within {deadline.seconds(job.duration):.0f} s, the deadline for the TSV's "
                        f"{job.duration:.0f} s ({deadline.floor_s:g} s + {deadline.seconds_per_audio_second:g} s per "
                        "second of audio): its worker hung (a stuck decoder, or a read from a stalled filesystem?) "
                        "and was killed",
                    ),
                )
            for worker in dead:
                job = worker.job
                pool.replace(worker)
                if job is None:
                    continue
                schedule.finished(job)
                if job.track_id in retried:
                    yield job, Failed("worker_crash", "the process died (decoder crash or out of memory)")
                else:
                    print(f"a worker died holding {job.track_id}; trying it again alone", file=sys.stderr)
                    retried.add(job.track_id)
                    suspects.append(job)
    finally:
        pool.close()


class JobsFailed(RuntimeError):
    """Some jobs of a run failed while the others were done; the message lists each failed track and why."""

    def __init__(self, failures: dict[str, str], total: int):
        self.failures = failures
        listed = "; ".join(f"{track_id}: {reason}" for track_id, reason in sorted(failures.items()))
        super().__init__(f"{len(failures)} of {total} tracks failed (the others are done): {listed}")


def run_all(
    task: Callable[[Job], object],
    jobs: Iterable[Job],
    workers: int,
    progress: tqdm.tqdm | None = None,
    deadline: Deadline = DEFAULT_DEADLINE,
) -> None:
    """Runs `task` on every job in worker processes (`run_jobs`), then raises JobsFailed naming those that failed:
    one bad track neither stops the others nor hangs the run."""
    jobs = list(jobs)
    failures = {}
    for job, result in run_jobs(task, jobs, workers, deadline=deadline):
        if isinstance(result, Failed):
            failures[job.track_id] = f"{result.kind}: {result.reason}"
        if progress is not None:
            progress.update()
    if failures:
        raise JobsFailed(failures, len(jobs))
