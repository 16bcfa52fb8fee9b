"""Tags audio files with one checkpoint or the average of several (`emorf_jax.tagger`), and prints their top tags
or writes all their probabilities to a CSV, JSON Lines or JSON file, one row as each file finishes.

    python -m emorf_jax.predict PATH... --checkpoint=CKPT [--checkpoint=CKPT ...] [--output=FILE.csv|.jsonl|.json]
        [--taggram] [--embeddings] [--decisions [--thresholds=FILE.tsv]] [--workers=N] [--backend=jax|onnxruntime]
    python -m emorf_jax.predict --describe=CKPT

PATH: audio files or folders (searched recursively for MP3, WAV, FLAC and OGG), at any sample rate and channel
count: mixed down and resampled by data preparation's own feature code. CKPT: any checkpoint a run writes
(`runs/demo/swa`, `runs/demo/best`, `runs/demo/snapshots/242`, ...); several are averaged (their probabilities).
Each whole track is cut into the evaluation's windows, run in batches of a fixed size, while --workers processes
decode and compute the features of the next files (`emorf_jax.bulk_tagging`). A .csv or .jsonl output gets each
file's row as it finishes; run again with the same PATHs and --output, it tags only the files not yet in it and
appends. A file that cannot be read gets a row with its reason (`error`) and one line on standard error, and the
others go on. Exit status: 0 when every input was tagged, 1 when some could not be, 2 for a usage error.
"""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tqdm

from data_prep.metadata import short_tag_name


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
    parser.add_argument("--batch_size", type=int, default=8, help="windows per model call")
    parser.add_argument(
        "--backend",
        default="jax",
        help="what runs the model: jax, or onnxruntime (each checkpoint exported to ONNX once and cached; the "
        "CP-ResNet family; needs the [export] extra)",
    )
    parser.add_argument(
        "--workers", type=int, help="processes computing features (default: one per core, at most 4; 0: none)"
    )
    parser.add_argument("--describe", metavar="CKPT", help="print a checkpoint's model card and exit")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Imported here, not at the top: the feature processes start by importing this module again (multiprocessing's
    # spawn) and need neither JAX nor the model.
    from emorf_jax import bulk_tagging
    from emorf_jax.tagger import audio_files, load_tagger, model_card, top_tags_line

    if args.describe:
        try:
            print(model_card(args.describe))
        except FileNotFoundError as error:
            parser.error(str(error))
        return 0
    if not args.checkpoint:
        parser.error("give at least one --checkpoint")
    if args.output and Path(args.output).suffix not in bulk_tagging.OUTPUT_SUFFIXES:
        parser.error(f"--output {args.output}: use a .csv, .jsonl or .json file name")
    if args.embeddings and not args.output:
        parser.error("--embeddings are written beside an --output file: give one")
    if args.thresholds and not args.decisions:
        parser.error("--thresholds are for --decisions: add it")
    if args.workers is not None and args.workers < 0:
        parser.error("--workers: give 0 or more")
    files = [str(path) for path in audio_files(args.paths)]
    if not files:
        parser.error("no audio files among the PATHs" if args.paths else "give at least one PATH")
    try:
        tagger = load_tagger(args.checkpoint, args.batch_size, args.backend)
        tagger.feature_settings  # noqa: B018 - a model of other input than audio is a usage error, said now
        thresholds = (
            bulk_tagging.decision_thresholds(tagger, args.thresholds, args.checkpoint) if args.decisions else None
        )
        output = (
            bulk_tagging.OutputFiles(
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
    except (FileNotFoundError, ValueError, ImportError) as error:
        parser.error(str(error))
    done = output.done if output else {}
    todo = [path for path in files if path not in done]
    if len(todo) < len(files):
        print(
            f"{args.output} holds {len(files) - len(todo)} of these files: tagging the other {len(todo)}",
            file=sys.stderr,
        )
    failed = sum(1 for path in files if done.get(path))
    tags, frame_seconds = tagger.tags, tagger.seconds_per_frame
    workers = bulk_tagging.default_workers() if args.workers is None else args.workers
    stream = bulk_tagging.tag_stream(tagger, todo, window_frames=args.window_frames, workers=workers)
    try:
        for path, result in tqdm.tqdm(
            stream, total=len(todo), desc="tagging", unit="file", disable=args.no_progress, file=sys.stderr
        ):
            if isinstance(result, str):
                print(result if path in result else f"{path}: {result}", file=sys.stderr)
                failed += 1
            if output:
                output.write(path, result)
            elif not isinstance(result, str):
                line = top_tags_line(path, result.probabilities, tags, args.top_k)
                if thresholds is not None:
                    decided = bulk_tagging.decided_tags(result.probabilities, thresholds, tags)
                    line += "\tabove threshold: " + (" ".join(decided) or "-")
                print(line, flush=True)
                if args.taggram:
                    for (start, stop, _), row in zip(result.windows, result.window_probabilities):
                        best = np.argsort(-row)[: args.top_k]
                        print(
                            f"  {start * frame_seconds:7.1f}-{stop * frame_seconds:7.1f} s  "
                            + "  ".join(f"{short_tag_name(tags[i])} {row[i]:.3f}" for i in best)
                        )
    finally:
        if output:
            output.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
