"""Tags audio files with one checkpoint or the average of several (`emorf_jax.tagger`), and prints their top tags
or writes all their probabilities to a CSV or JSON file.

    python -m emorf_jax.predict PATH... --checkpoint=CKPT [--checkpoint=CKPT ...] [--output=FILE.csv|FILE.json]
    python -m emorf_jax.predict --describe=CKPT

PATH: audio files or folders (searched recursively for MP3, WAV, FLAC and OGG), at any sample rate and channel
count: mixed down and resampled by data preparation's own feature code. CKPT: any checkpoint a run writes
(`runs/demo/swa`, `runs/demo/best`, `runs/demo/snapshots/242`, ...); several are averaged (their probabilities).
Each whole track is cut into the evaluation's windows, run in batches of a fixed size. A file that cannot be read
gets one line on standard error and the others go on. Exit status: 0 when every input was tagged, 1 when some could
not be, 2 for a usage error.
"""

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tqdm

from data_prep.metadata import short_tag_name
from emorf_jax.tagger import TrackTags, audio_files, load_tagger, model_card, top_tags_line


def _write(output: Path, results: dict[str, np.ndarray], tags: list[str], top_k: int) -> None:
    if output.suffix == ".json":
        output.write_text(json.dumps({path: dict(zip(tags, p.tolist())) for path, p in results.items()}, indent=1))
        return
    with output.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *tags, "top_tags"])
        for path, probabilities in results.items():
            top = ";".join(short_tag_name(tags[i]) for i in np.argsort(-probabilities)[:top_k])
            writer.writerow([path, *(f"{p:.6f}" for p in probabilities), top])


def _write_taggram(output: Path, taggrams: dict[str, TrackTags], tags: list[str], seconds_per_frame: float) -> None:
    """Per-window probabilities beside the output: `<stem>.taggram.csv` (path, window start/end in s, tags)."""
    with output.with_name(output.stem + ".taggram.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "start_s", "end_s", *tags])
        for path, track in taggrams.items():
            for (start, stop, _), row in zip(track.windows, track.window_probabilities):
                writer.writerow(
                    [
                        path,
                        f"{start * seconds_per_frame:.2f}",
                        f"{stop * seconds_per_frame:.2f}",
                        *(f"{p:.6f}" for p in row),
                    ]
                )


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
    parser.add_argument("--output", help="FILE.csv or FILE.json; without it, the top tags on standard output")
    parser.add_argument("--top_k", type=int, default=5, help="tags listed per file (default 5)")
    parser.add_argument(
        "--taggram",
        action="store_true",
        help="also the per-window probabilities: <output stem>.taggram.csv, or on standard output",
    )
    parser.add_argument("--window_frames", type=int, help="window length (default: the first checkpoint's)")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per model call")
    parser.add_argument("--describe", metavar="CKPT", help="print a checkpoint's model card and exit")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.describe:
        try:
            print(model_card(args.describe))
        except FileNotFoundError as error:
            parser.error(str(error))
        return 0
    if not args.checkpoint:
        parser.error("give at least one --checkpoint")
    if args.output and Path(args.output).suffix not in (".csv", ".json"):
        parser.error(f"--output {args.output}: use a .csv or .json file name")
    files = audio_files(args.paths)
    if not files:
        parser.error("no audio files among the PATHs" if args.paths else "give at least one PATH")
    try:
        tagger = load_tagger(args.checkpoint, args.batch_size)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    tags = tagger.tags
    results, failed = {}, 0
    for path in tqdm.tqdm(files, desc="tagging", unit="file", disable=args.no_progress, file=sys.stderr):
        try:
            results[str(path)] = tagger.tag_file(path, args.window_frames)
        except (OSError, ValueError) as error:  # features.AudioError is a ValueError
            reason = f"cannot read: {error.strerror}" if isinstance(error, OSError) and error.strerror else str(error)
            print(reason if str(path) in reason else f"{path}: {reason}", file=sys.stderr)
            failed += 1
    frame_seconds = tagger.seconds_per_frame
    if args.output:
        output = Path(args.output)
        _write(output, {path: track.probabilities for path, track in results.items()}, tags, args.top_k)
        if args.taggram:
            _write_taggram(output, results, tags, frame_seconds)
    else:
        for path, track in results.items():
            print(top_tags_line(path, track.probabilities, tags, args.top_k))
            if args.taggram:
                for (start, stop, _), row in zip(track.windows, track.window_probabilities):
                    best = np.argsort(-row)[: args.top_k]
                    print(
                        f"  {start * frame_seconds:7.1f}-{stop * frame_seconds:7.1f} s  "
                        + "  ".join(f"{short_tag_name(tags[i])} {row[i]:.3f}" for i in best)
                    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
