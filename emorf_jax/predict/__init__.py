"""Tagging folders of any size: features in worker processes overlapped with the model, rows written as each file
finishes, a rerun that resumes, decisions and embeddings; what `python -m emorf_jax.predict` runs.

- `tag_stream` decodes and computes features in `workers` processes (spawned: they import
  `emorf_jax.track_features` and data preparation's feature code, no JAX), at most `2 x workers` files in flight,
  each file decoded and computed in blocks and its blocks sent as they are ready, while this process runs each
  window as soon as its frames are there (`Tagger.tag_blocks`, windows in batches): memory grows neither with the
  number of files nor with a track's length. Results come in the order of the files; a file that fails gives its
  reason and the others go on. A file whose features do not come within its deadline (`data_prep.deadline`: a read
  that never returns) has its process killed and gets an error row; a process that dies fails only its file.
- `OutputFiles` writes one row per file, flushed as each file finishes: CSV (`path`, the tags, `top_tags`,
  `decisions` with thresholds, `error`) or JSON Lines (`.jsonl`, the same fields); `.json` is one document written
  at the end (no resume). Beside it: `<stem>.taggram.csv` (each window's probabilities), `<stem>.embeddings.npy`
  (float32, row i the embedding of the output's row i, NaN for a file that failed) and with the taggram
  `<stem>.taggram_embeddings.npy` (row j: the window of the taggram's row j). A file's side rows are written
  before its output row, so the output's complete rows are the files done: reopened, an output keeps those rows
  (a row cut by a kill is dropped), its side files are cut back to them, and the files in it are not tagged again.
  A write that fails (a full disk: `files.DISK_FULL_ERRNOS`) raises `OutputWriteError` naming the file; the rows before
  it stay as they are, so the same command run again after space is freed resumes after them.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from data_prep.deadline import DEFAULT_DEADLINE, Deadline
from data_prep.features import FeatureSettings
from data_prep.metadata import short_tag_name
from emorf_jax import thresholds, track_features
from emorf_jax.tagger import Tagger, TrackTags, top_tags

OUTPUT_SUFFIXES = (".csv", ".jsonl", ".json")
# What a write fails with when the disk is full or a file-size or disk quota limit is reached.


class OutputWriteError(OSError):
    """A write to one of a run's output files failed; `filename` is that file."""


@contextlib.contextmanager
def _writing(path: Path | str) -> Iterator[None]:
    """Any OSError of the writes inside becomes an OutputWriteError naming `path` (a file object's write error
    names no file)."""
    try:
        yield
    except OSError as error:
        raise OutputWriteError(error.errno, error.strerror or str(error), str(path)) from error


def default_workers() -> int:
    """Feature processes by default: one per two cores, at least 1 and at most 4. Decoding and features cost a
    fraction of the model, which runs on every core: on 2 cores one process was faster than two and held 0.16 GiB
    less (benchmarks/RESULTS.md)."""
    return max(1, min(4, (os.cpu_count() or 1) // 2))


def _reason(error: BaseException) -> str:
    """What went wrong with a file, in one line (`track_features.failure_reason`)."""
    return track_features.failure_reason(error)


def _overrun(deadline: Deadline, duration: float | None) -> str:
    """A file's error row when the waits for its features passed its deadline (`data_prep.deadline`; counted is the
    time spent waiting for the file's next block, not the time the model runs)."""
    floor, per_second = deadline.floor_s, deadline.seconds_per_audio_second
    basis = (
        f"the deadline for its {duration:.0f} s of audio ({floor:g} s + {per_second:g} s per second)"
        if duration is not None
        else f"the deadline of a file of unknown duration ({floor:g} s)"
    )
    return (
        f"no features within {deadline.seconds(duration):.0f} s, {basis}: its feature process hung (a read that never "
        "returns, as from a named pipe or a hung network mount, or a stuck decoder?) and was killed"
    )


_DIED = "its feature process died (killed, or out of memory)"


class FileFailed(Exception):
    """The features of a file could not be computed; `reason` is its error row."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass
class _Worker:
    """A feature process, the connection it sends its messages on, and the indices of the files it was given, in
    order: it works on the first."""

    process: multiprocessing.process.BaseProcess
    connection: multiprocessing.connection.Connection
    files: deque = dataclasses.field(default_factory=deque)


class _FeatureProcesses:
    """Feature processes (`track_features.feature_worker`: spawned, no JAX; a fork would copy this process's JAX
    threads and memory into each) driven one file at a time over their own pipes, at most `FILES_PER_WORKER` files
    given to each, so that this process always knows which file a process holds, and can kill one that overruns
    its file's deadline, or replace one that died, without losing the others."""

    FILES_PER_WORKER = 2

    def __init__(self, paths: Sequence[str], settings: FeatureSettings, size: int, deadline: Deadline):
        self.paths, self.settings, self.deadline = paths, settings, deadline
        self._context = multiprocessing.get_context("spawn")
        self.workers = [self._start() for _ in range(size)]

    def _start(self) -> _Worker:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=track_features.feature_worker, args=(child_end, self.settings, os.getpid()), daemon=True
        )
        process.start()
        child_end.close()
        return _Worker(process, parent_end)

    def give(self, index: int) -> bool:
        """Gives file `index` to the process with the fewest files; False when every one has its share."""
        worker = min(self.workers, key=lambda worker: len(worker.files))
        if len(worker.files) >= self.FILES_PER_WORKER:
            return False
        self._send(worker, index)
        return True

    def _send(self, worker: _Worker, index: int) -> None:
        worker.files.append(index)
        with contextlib.suppress(OSError):  # a dead process is noticed when its file is read
            worker.connection.send(self.paths[index])

    def holder(self, index: int) -> _Worker:
        return next(worker for worker in self.workers if worker.files and worker.files[0] == index)

    def replace(self, worker: _Worker) -> None:
        """Kills a process and starts a fresh one in its place, which is given the files the old one had not begun."""
        worker.process.kill()
        worker.process.join()
        worker.connection.close()
        fresh = self._start()
        self.workers[self.workers.index(worker)] = fresh
        for index in list(worker.files)[1:]:
            self._send(fresh, index)

    def blocks(self, worker: _Worker, index: int) -> Iterator[np.ndarray]:
        """The stored feature blocks of file `index` (its holder's first) as they come. FileFailed with the reason
        when the file fails, its process dies, or the waits for it pass its deadline. A file its process has not
        ended (died, overdue, or not read to its end) is still its holder's first: see `settle`."""
        duration, waited = None, 0.0
        while True:
            allowed = self.deadline.seconds(duration)
            if not worker.connection.poll():
                began = time.monotonic()
                multiprocessing.connection.wait(
                    [worker.connection, worker.process.sentinel], max(0.0, allowed - waited)
                )
                waited += time.monotonic() - began
                if not worker.connection.poll():
                    if not worker.process.is_alive():
                        raise FileFailed(_DIED)
                    if waited >= allowed:
                        raise FileFailed(_overrun(self.deadline, duration))
                    continue
            try:
                kind, value = worker.connection.recv()
            except (EOFError, OSError):
                raise FileFailed(_DIED) from None
            if kind == "duration":
                duration = value
            elif kind == "frames":
                yield value
            elif kind == "error":
                worker.files.popleft()
                raise FileFailed(value)
            else:
                worker.files.popleft()
                return

    def settle(self, worker: _Worker, index: int) -> None:
        """After file `index` is done with: if its process did not end it (it died, overran its deadline, or its
        blocks were not all read), that process cannot go on, and is replaced."""
        if worker.files and worker.files[0] == index:
            self.replace(worker)

    def close(self) -> None:
        """Ends every process, a hung one too: none is left behind."""
        for worker in self.workers:
            worker.process.kill()
        for worker in self.workers:
            worker.process.join()
            worker.connection.close()


def _named_failures(blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """`blocks`, any error of the file raised as its FileFailed."""
    try:
        yield from blocks
    except Exception as error:  # any failure of one file is that file's row
        raise FileFailed(_reason(error)) from error


def feature_stream(
    paths: Sequence[str], settings: FeatureSettings, workers: int, deadline: Deadline = DEFAULT_DEADLINE
) -> Iterator[tuple[str, Iterator[np.ndarray]]]:
    """(path, its stored feature blocks as they are computed) of each file, in order; the blocks of a file that fails
    end with FileFailed and its reason. Computed in `workers` processes with at most 2 x workers files in flight,
    each file's process killed when the waits for it pass `deadline` and replaced when it dies; or in this process
    for 0 workers (no deadline). Each file's blocks must be read (or dropped) before the next file's: a file whose
    blocks are not all read has its process replaced. The processes end with the stream, none left behind."""
    if workers == 0:
        for path in paths:
            yield path, _named_failures(track_features.stored_file_blocks(path, settings))
        return
    processes = _FeatureProcesses(paths, settings, workers, deadline)
    try:
        given = 0
        for index, path in enumerate(paths):
            while given < len(paths) and processes.give(given):
                given += 1
            worker = processes.holder(index)
            blocks = processes.blocks(worker, index)
            try:
                yield path, blocks
            finally:
                blocks.close()
            processes.settle(worker, index)
    finally:
        processes.close()


def tag_stream(
    tagger: Tagger,
    paths: Sequence[str],
    *,
    window_frames: int | None = None,
    workers: int = 0,
    deadline: Deadline = DEFAULT_DEADLINE,
) -> Iterator[tuple[str, TrackTags | str]]:
    """(path, its tags or why it has none) of each file, in order: features from `feature_stream`, each window run
    here as soon as its frames are there (`Tagger.tag_blocks`), so that memory does not grow with a track's length."""
    for path, blocks in feature_stream(paths, tagger.feature_settings, workers, deadline):
        try:
            result: TrackTags | str = tagger.tag_blocks(blocks, window_frames)
        except FileFailed as failure:
            result = failure.reason
        except ValueError as error:  # a clip the model cannot take (e.g. shorter than its smallest input)
            result = _reason(error)
        yield path, result


def decision_thresholds(tagger: Tagger, thresholds_path: str | None, checkpoint_paths: Sequence[str]) -> np.ndarray:
    """Per tag of `tagger`, the threshold above which a tag is decided: from a `tag<TAB>threshold` file (every
    report folder's thresholds.tsv), else the one checkpoint's meta "thresholds". ValueError saying what to pass
    where neither is given."""
    if thresholds_path:
        names, values = thresholds.read(thresholds_path)
        by_tag = dict(zip(names, values.tolist()))
        missing = [tag for tag in tagger.tags if tag not in by_tag]
        if missing:
            raise ValueError(
                f"{thresholds_path} has no threshold for {len(missing)} of the model's tags ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}): use the thresholds.tsv of a report of a model with these tags"
            )
        return np.array([by_tag[tag] for tag in tagger.tags], np.float64)
    if len(tagger.members) > 1:
        raise ValueError(
            "several checkpoints are averaged, and no checkpoint's own thresholds fit their average: pass "
            "--thresholds FILE.tsv, e.g. the thresholds.tsv of `python -m emorf_jax.ensemble` for these checkpoints"
        )
    return thresholds.read(checkpoint_paths[0])[1]


def decided_tags(probabilities: np.ndarray, thresholds: np.ndarray, tags: Sequence[str]) -> list[str]:
    """The short names of the tags whose probability is above (strictly) their threshold, in tag order."""
    return [short_tag_name(tags[i]) for i in np.flatnonzero(probabilities > thresholds)]


def _cut_after_last_line(path: Path) -> None:
    """Drop a last line without its newline: the part of a row that a killed run was writing."""
    with path.open("rb+") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            end = start
        f.truncate(0)


class _RowFile:
    """A CSV (with a header) or JSON Lines file of rows, each flushed when written. An existing file keeps its
    complete rows, if its columns are these; `rows` holds each row's path and error."""

    def __init__(self, path: Path, columns: list[str]):
        self.path, self.columns, self.jsonl = path, columns, path.suffix == ".jsonl"
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            _cut_after_last_line(path)
            self.rows = [{"path": row["path"], "error": row.get("error") or None} for row in self._read()]
        self._open()

    def _open(self) -> None:
        self._file: IO[str] = self.path.open("a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        if not self.jsonl and self.path.stat().st_size == 0:
            with _writing(self.path):
                self._csv.writerow(self.columns)
                self._file.flush()

    def _read(self) -> Iterator[dict[str, Any]]:
        """The file's rows, after a check that a CSV's header (a JSON row's fields) are these columns."""
        with self.path.open(newline="", encoding="utf-8") as f:
            rows = (json.loads(line) for line in f) if self.jsonl else csv.DictReader(f)
            for number, row in enumerate(rows):
                if number == 0 and list(row) != self.columns and (not self.jsonl or not row.get("error")):
                    raise ValueError(
                        f"{self.path} was written with other columns (another model's tags, or with or without "
                        "--decisions): give a new --output"
                    )
                yield row

    def keep(self, count: int) -> None:
        """Keep the first `count` rows only (the side rows of the files whose output row was written)."""
        if count >= len(self.rows):
            return
        self._file.close()
        temporary = self.path.with_name(self.path.name + ".part")
        with self.path.open(newline="", encoding="utf-8") as f, _writing(temporary):
            lines = f if self.jsonl else csv.reader(f)
            with temporary.open("w", newline="", encoding="utf-8") as out:
                writer = csv.writer(out)
                for _, line in zip(range(count + (not self.jsonl)), lines):  # a CSV's header too
                    if self.jsonl:
                        out.write(line)
                    else:
                        writer.writerow(line)
        os.replace(temporary, self.path)
        self.rows = self.rows[:count]
        self._open()

    def write(self, row: dict[str, Any]) -> None:
        with _writing(self.path):
            if self.jsonl:
                self._file.write(json.dumps(row) + "\n")
            else:
                self._csv.writerow([row.get(column, "") for column in self.columns])
            self._file.flush()
        self.rows.append({"path": row["path"], "error": row.get("error") or None})

    def close(self) -> None:
        with _writing(self.path):
            self._file.close()


class _GrowingNpy:
    """A float32 (rows, width) .npy file that grows by appended rows, its header's row count rewritten after each
    (numpy leaves room in the header for that); reopened, it keeps the rows asked for."""

    def __init__(self, path: Path, width: int, keep: int):
        self.path, self.width = path, width
        if not path.exists():
            with _writing(path), path.open("wb") as f:
                self._write_header(f, 0)
        self._file = path.open("rb+")
        np.lib.format.read_magic(self._file)
        shape, _, dtype = np.lib.format.read_array_header_1_0(self._file)
        self._offset = self._file.tell()
        if dtype != np.float32 or shape[1:] != (width,) or shape[0] < keep:
            raise ValueError(
                f"{path} holds {shape} {dtype} embeddings, not {keep} rows of {width} float32 values: give a new "
                "--output"
            )
        self.rows = keep
        with _writing(path):
            self._file.truncate(self._offset + keep * width * 4)
            self._update_header()

    def _write_header(self, f: IO[bytes], rows: int) -> None:
        header = {"descr": "<f4", "fortran_order": False, "shape": (rows, self.width)}
        np.lib.format.write_array_header_1_0(f, header)

    def _update_header(self) -> None:
        self._file.seek(0)
        self._write_header(self._file, self.rows)
        if self._file.tell() != self._offset:
            raise RuntimeError(f"the header of {self.path} changed length")  # numpy's reserved room ran out
        self._file.flush()

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, "<f4").reshape(-1, self.width)
        with _writing(self.path):
            self._file.seek(0, os.SEEK_END)
            self._file.write(values.tobytes())
            self._file.flush()
            self.rows += len(values)
            self._update_header()

    def close(self) -> None:
        with _writing(self.path):
            self._file.close()


class OutputFiles:
    """The rows of one run (see the module's docstring): `done` holds the files already in an existing CSV or
    JSON Lines output, {path: error or None}; `write` adds a file's row and its side rows."""

    def __init__(
        self,
        output: Path,
        tagger: Tagger,
        *,
        top_k: int,
        taggram: bool = False,
        embeddings: bool = False,
        thresholds: np.ndarray | None = None,
    ):
        if output.suffix not in OUTPUT_SUFFIXES:
            raise ValueError(f"--output {output}: use a .csv, .jsonl or .json file name")
        self.output, self.tags, self.top_k, self.thresholds = output, tagger.tags, top_k, thresholds
        self.seconds_per_frame = tagger.seconds_per_frame
        self.document: dict[str, dict[str, Any]] | None = {} if output.suffix == ".json" else None
        columns = ["path", *self.tags, "top_tags", *(["decisions"] if thresholds is not None else []), "error"]
        rows = _RowFile(output, columns) if self.document is None else None
        self._rows = rows
        if self.document is not None:
            for side in ("taggram.csv", "embeddings.npy", "taggram_embeddings.npy"):
                output.with_name(f"{output.stem}.{side}").unlink(missing_ok=True)
        self.done = {row["path"]: row.get("error") or None for row in rows.rows} if rows else {}
        self._taggram = self._embeddings = self._window_embeddings = None
        self.failed = False
        if taggram:
            self._taggram = _RowFile(
                output.with_name(f"{output.stem}.taggram.csv"), ["path", "start_s", "end_s"] + [*self.tags]
            )
            kept = next((i for i, row in enumerate(self._taggram.rows) if row["path"] not in self.done), None)
            self._taggram.keep(len(self._taggram.rows) if kept is None else kept)
        if embeddings:
            width = tagger.embedding_size
            self._embeddings = _GrowingNpy(output.with_name(f"{output.stem}.embeddings.npy"), width, len(self.done))
            if taggram:
                self._window_embeddings = _GrowingNpy(
                    output.with_name(f"{output.stem}.taggram_embeddings.npy"), width, len(self._taggram.rows)
                )

    def write(self, path: str, result: TrackTags | str) -> None:
        """One file's row (and side rows): its tags, or with a reason its failure. OutputWriteError when a file
        cannot be written; the rows written before it are complete, and `close` then writes nothing more."""
        try:
            self._write(path, result)
        except OutputWriteError:
            self.failed = True
            raise

    def _write(self, path: str, result: TrackTags | str) -> None:
        if isinstance(result, str):
            row = {"path": path, "error": result}
            if self._embeddings:
                self._embeddings.append(np.full(self._embeddings.width, np.nan, np.float32))
        else:
            if self._taggram:
                for (start, stop, _), probabilities in zip(result.windows, result.window_probabilities):
                    self._taggram.write(
                        {
                            "path": path,
                            "start_s": f"{start * self.seconds_per_frame:.2f}",
                            "end_s": f"{stop * self.seconds_per_frame:.2f}",
                            **{tag: f"{p:.6f}" for tag, p in zip(self.tags, probabilities)},
                        }
                    )
                if self._window_embeddings:
                    self._window_embeddings.append(result.window_embeddings)
            if self._embeddings:
                self._embeddings.append(result.embedding)
            row = self._row(path, result.probabilities)
        if self._rows:
            self._rows.write(row)
        else:
            self.document[path] = {key: value for key, value in row.items() if key not in ("path", "top_tags")}

    def _row(self, path: str, probabilities: np.ndarray) -> dict[str, Any]:
        """A tagged file's fields: probabilities as CSV text (6 decimals) or JSON numbers, top and decided tags."""
        as_text = self._rows is not None and not self._rows.jsonl
        row: dict[str, Any] = {
            "path": path,
            **{tag: f"{p:.6f}" if as_text else float(p) for tag, p in zip(self.tags, probabilities)},
            "top_tags": [name for name, _ in top_tags(probabilities, self.tags, self.top_k)],
        }
        if self.thresholds is not None:
            row["decisions"] = decided_tags(probabilities, self.thresholds, self.tags)
        if as_text:
            row.update({key: ";".join(row[key]) for key in ("top_tags", "decisions") if key in row})
        if self.document is None:
            row["error"] = None if not as_text else ""
        return row

    def close(self) -> None:
        """Close the files; a `.json` output is written now, in one piece (through a temporary file, so that a
        failed write leaves no half document). After a failed write, the files are closed and nothing more is
        written."""
        for part in (self._rows, self._taggram, self._embeddings, self._window_embeddings):
            if part:
                with contextlib.suppress(OutputWriteError) if self.failed else contextlib.nullcontext():
                    part.close()
        if self.document is not None and not self.failed:
            temporary = self.output.with_name(self.output.name + ".part")
            try:
                with _writing(self.output):
                    temporary.write_text(json.dumps(self.document, indent=1))
                    os.replace(temporary, self.output)
            finally:
                temporary.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class RemainingFiles:
    """What a run still has to tag when its output holds rows of an earlier run: `todo` in the given order;
    `finished`, the files the output holds already; `failed`, those of them whose row is an error."""

    todo: list[str]
    finished: int
    failed: int


def remaining_files(files: Sequence[str], output: OutputFiles | None) -> RemainingFiles:
    """The files not yet in `output` (all of them without one): a rerun of a killed run tags each file once."""
    done = output.done if output else {}
    todo = [path for path in files if path not in done]
    return RemainingFiles(todo, len(files) - len(todo), sum(1 for path in files if done.get(path)))
