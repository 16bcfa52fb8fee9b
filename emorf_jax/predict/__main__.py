"""Tags audio files with one checkpoint or the average of several (`emorf_jax.tagger`), and prints their top tags
or writes all their probabilities to a CSV, JSON Lines or JSON file, one row as each file finishes.

    python -m emorf_jax.predict PATH... --checkpoint=CKPT [--checkpoint=CKPT ...] [--output=FILE.csv|.jsonl|.json]
        [--taggram] [--embeddings] [--decisions [--thresholds=FILE.tsv]] [--workers=N] [--backend=jax|onnxruntime]
        [--precision=float32|int8 [--calibration_audio=PATH]] [--deadline_floor_s=S] [--deadline_s_per_audio_s=S]
    python -m emorf_jax.predict --describe=CKPT

PATH: audio files or folders (searched recursively for MP3, WAV, FLAC, OGG, Opus, AIFF, M4A, AAC and WMA; the last
three through ffmpeg when it is on the PATH), at any sample rate and channel
count: mixed down and resampled by data preparation's own feature code. CKPT: any checkpoint a run writes
(`runs/demo/swa`, `runs/demo/best`, `runs/demo/snapshots/242`, ...); several are averaged (their probabilities).
Each whole track is cut into the evaluation's windows, run in batches of a fixed size as soon as their frames are
decoded, while --workers processes decode and compute the features of the next files in blocks (`emorf_jax.predict`):
memory does not grow with a track's length. A file whose features keep the run waiting past its deadline (a read
that never returns: a named pipe, a hung network mount) gets an error row and its process is killed. A .csv or
.jsonl output gets each file's row as it finishes; run again with the same PATHs and --output, it tags only the files
not yet in it and appends. A file that cannot be read gets a row with its reason (`error`) and one line on standard
error, and the others go on. An output that cannot be written (a full disk) ends the run with one line naming the
file; its rows so far stay, and the same command run again after space is freed tags the rest. A reader of standard
output that stops reading (`| head -1`) ends the run quietly. Exit status: 0 when every input was tagged, 1 when some
could not be (or the output could not be written), 2 for a usage error.
"""

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tqdm

from data_prep.deadline import DEFAULT_DEADLINE, Deadline

if TYPE_CHECKING:  # the feature processes import this module and need neither JAX nor the model
    from emorf_jax.tagger import TrackTags


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emorf_jax.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="audio files or folders")
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="CKPT",
        help="a checkpoint directory; repeat to average several",
    )
    parser.add_argument(
        "--output",
        help="FILE.csv or FILE.jsonl (a row per file as it finishes; a rerun resumes), or FILE.json (written at the "
        "end); without it, the top tags on standard output",
    )
    parser.add_argument("--top_k", type=int, default=5, help="tags listed per file (default 5)")
    parser.add_argument(
        "--taggram",
        action="store_true",
        help="also the per-window probabilities: <output stem>.taggram.csv, or on standard output",
    )
    parser.add_argument(
        "--embeddings",
        action="store_true",
        help="also the pooled features the classifier reads, float32: <output stem>.embeddings.npy (row i: the "
        "output's row i), with --taggram <output stem>.taggram_embeddings.npy (row j: the taggram's row j)",
    )
    parser.add_argument(
        "--decisions",
        action="store_true",
        help="also the tags whose probability is above their threshold (--thresholds, else the checkpoint's own)",
    )
    parser.add_argument(
        "--thresholds",
        metavar="FILE.tsv",
        help="tag<TAB>threshold lines for --decisions, e.g. a run's report/<model>/thresholds.tsv",
    )
    parser.add_argument("--window_frames", type=int, help="window length (default: the first checkpoint's)")
    parser.add_argument(
        "--batch_size",
        type=int,
        help="windows per model call (default: 2 on a CPU, where it is faster than 8 and holds 2.5x less memory "
        "(benchmarks/RESULTS.md); 8 on a GPU or TPU)",
    )
    parser.add_argument(
        "--backend",
        help="what runs the model: onnxruntime (each checkpoint exported to ONNX once and cached; the CP-ResNet "
        "family) or jax; default: onnxruntime on a CPU, where it gives the same probabilities faster, jax on a GPU "
        "or TPU and for the baselines",
    )
    parser.add_argument(
        "--precision",
        default="float32",
        help="float32, or int8 (the onnxruntime backend, the CPU default): each exported model with its largest "
        "convolutions in int8, faster, with slightly different probabilities (docs/tagging.md); it is calibrated on "
        "--calibration_audio and cached",
    )
    parser.add_argument(
        "--calibration_audio",
        action="append",
        default=[],
        metavar="PATH",
        help="audio files or folders whose first windows (64, at most 4 per file) set an int8 model's activation "
        "ranges; default: the files being tagged, in order. Repeatable",
    )
    parser.add_argument(
        "--workers", type=int, help="processes computing features (default: one per two cores, 1 to 4; 0: none)"
    )
    parser.add_argument(
        "--deadline_floor_s",
        type=float,
        default=DEFAULT_DEADLINE.floor_s,
        help="a file's deadline: this floor (default %(default)g), plus --deadline_s_per_audio_s per second of the "
        "duration its header announces; a feature process that keeps the run waiting for a file longer (a read that "
        "never returns) is killed and the file gets an error row (with --workers=0: no deadline)",
    )
    parser.add_argument(
        "--deadline_s_per_audio_s",
        type=float,
        default=DEFAULT_DEADLINE.seconds_per_audio_second,
        help="the deadline's part per second of audio (default %(default)g)",
    )
    parser.add_argument("--describe", metavar="CKPT", help="print a checkpoint's model card and exit")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


class _ReaderGone(Exception):
    """The reader of standard output has stopped reading (e.g. `| head -1`)."""


class _StandardOutputError(OSError):
    """Standard output cannot be written (e.g. redirected to a full disk)."""


def _show(text: str) -> None:
    """A line on standard output; a closed pipe raises _ReaderGone, a failed write a _StandardOutputError."""
    try:
        print(text, flush=True)
    except BrokenPipeError as error:
        raise _ReaderGone from error
    except OSError as error:
        raise _StandardOutputError(error.errno, error.strerror or str(error), "standard output") from error


def _write_error_line(error: OSError, output: str | None, written: int, left: int) -> str:
    """The one line for an output that could not be written: which file, why, and what to do."""
    from data_prep.files import DISK_FULL_ERRNOS

    line = f"python -m emorf_jax.predict: error: cannot write {error.filename}: {error.strerror}"
    if error.errno not in DISK_FULL_ERRNOS:
        return line
    line += "; free space and run the same command again"
    if output and not output.endswith(".json"):
        line += f": it keeps the {written} files written and tags the other {left}"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except (_ReaderGone, _StandardOutputError) as error:
        # Nothing more can be written there: what is still buffered goes nowhere (not even at exit). A reader that
        # has gone ends the run quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(error, _ReaderGone):
            return 0
        print(_write_error_line(error, None, 0, 0), file=sys.stderr)
        return 1


def _run(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Imported here, not at the top: the feature processes start by importing this module again (multiprocessing's
    # spawn) and need neither JAX nor the model.
    from emorf_jax import predict
    from emorf_jax.tagger import audio_files, load_tagger, model_card

    if args.describe:
        try:
            card = model_card(args.describe)
        except FileNotFoundError as error:
            parser.error(str(error))
        _show(card)
        return 0
    if not args.checkpoint:
        parser.error("give at least one --checkpoint")
    if args.output and Path(args.output).suffix not in predict.OUTPUT_SUFFIXES:
        parser.error(f"--output {args.output}: use a .csv, .jsonl or .json file name")
    if args.embeddings and not args.output:
        parser.error("--embeddings are written beside an --output file: give one")
    if args.thresholds and not args.decisions:
        parser.error("--thresholds are for --decisions: add it")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers: give 0 or more")
    try:
        deadline = Deadline(args.deadline_floor_s, args.deadline_s_per_audio_s)
    except ValueError as error:
        parser.error(str(error))
    files = [str(path) for path in audio_files(args.paths)]
    if not files:
        parser.error("no audio files among the PATHs" if args.paths else "give at least one PATH")
    try:
        calibration_files = audio_files(args.calibration_audio) if args.calibration_audio else files
        tagger = load_tagger(args.checkpoint, args.batch_size, args.backend, args.precision, calibration_files)
        tagger.feature_settings  # noqa: B018 - a model of other input than audio is a usage error, said now
        thresholds = predict.decision_thresholds(tagger, args.thresholds, args.checkpoint) if args.decisions else None
        output = (
            predict.OutputFiles(
                Path(args.output),
                tagger,
                top_k=args.top_k,
                taggram=args.taggram,
                embeddings=args.embeddings,
                thresholds=thresholds,
            )
            if args.output
            else None
        )
    except predict.OutputWriteError as error:
        print(_write_error_line(error, args.output, 0, len(files)), file=sys.stderr)
        return 1
    except (OSError, ValueError, ImportError) as error:
        parser.error(str(error))
    remaining = predict.remaining_files(files, output)
    if remaining.finished:
        print(
            f"{args.output} holds {remaining.finished} of these files: tagging the other {len(remaining.todo)}",
            file=sys.stderr,
        )
    todo, failed = remaining.todo, remaining.failed
    tags, frame_seconds = tagger.tags, tagger.seconds_per_frame
    workers = predict.default_workers() if args.workers is None else args.workers
    stream = predict.tag_stream(tagger, todo, window_frames=args.window_frames, workers=workers, deadline=deadline)
    written = 0
    try:
        try:
            with contextlib.closing(stream):
                for path, result in tqdm.tqdm(
                    stream, total=len(todo), desc="tagging", unit="file", disable=args.no_progress, file=sys.stderr
                ):
                    if isinstance(result, str):
                        print(result if path in result else f"{path}: {result}", file=sys.stderr)
                        failed += 1
                    if output:
                        output.write(path, result)
                    elif not isinstance(result, str):
                        _show_tags(path, result, tags, thresholds, args.top_k, frame_seconds if args.taggram else None)
                    written += 1
        finally:
            if output:
                output.close()  # after a failed write, it closes the files and writes nothing more
    except predict.OutputWriteError as error:
        print(_write_error_line(error, args.output, remaining.finished + written, len(todo) - written), file=sys.stderr)
        return 1
    return 1 if failed else 0


def _show_tags(
    path: str,
    result: "TrackTags",
    tags: Sequence[str],
    thresholds: np.ndarray | None,
    top_k: int,
    taggram_frame_seconds: float | None,
) -> None:
    """A tagged file's line on standard output: its top tags, the decided ones, and with the taggram a line per
    window."""
    from emorf_jax import predict
    from emorf_jax.tagger import format_top_tags, top_tags_line

    line = top_tags_line(path, result.probabilities, tags, top_k)
    if thresholds is not None:
        decided = predict.decided_tags(result.probabilities, thresholds, tags)
        line += "\tabove threshold: " + (" ".join(decided) or "-")
    _show(line)
    if taggram_frame_seconds is not None:
        for (start, stop, _), row in zip(result.windows, result.window_probabilities):
            seconds = f"{start * taggram_frame_seconds:7.1f}-{stop * taggram_frame_seconds:7.1f} s"
            _show(f"  {seconds}  {format_top_tags(row, tags, top_k)}")


if __name__ == "__main__":
    sys.exit(main())
