"""Tags audio files with one checkpoint or the average of several:

    python -m emorf_jax.predict PATH... --checkpoint=CKPT [--checkpoint=CKPT ...] [--output=FILE.csv|FILE.json]
    python -m emorf_jax.predict --describe=CKPT

PATH: audio files or folders (searched recursively for MP3, WAV, FLAC and OGG), at any sample rate and channel
count: mixed down and resampled by data preparation's own feature code. CKPT: any checkpoint a run writes
(`runs/demo/swa`, `runs/demo/best`, `runs/demo/snapshots/242`, ...); several are averaged (their probabilities).
Each whole track is cut into the evaluation's windows (`input_pipeline.window_ranges`), run in batches of a fixed
size. A file that cannot be read gets one line on standard error and the others go on. Exit status: 0 when every
input was tagged, 1 when some could not be, 2 for a usage error.
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
from scipy.special import expit

from data_prep import features
from emorf_jax import inference, input_pipeline
from emorf_jax.models import receptive_field, registry

AUDIO_SUFFIXES = (".mp3", ".wav", ".flac", ".ogg")
TAG_PREFIX_SEPARATOR = "---"  # tags read like "mood/theme---happy"; tables show "happy"


def audio_files(paths: Sequence[str]) -> list[Path]:
    """The files named, and the audio files below the folders named, in a stable order."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        else:
            found.append(path)  # a missing or non-audio file is reported when it is read
    return found


def load_taggers(checkpoints: Sequence[str], batch_size: int) -> list[inference.Tagger]:
    """Taggers of the checkpoints; all must share tags, features and normalisation, or none is returned."""
    taggers = [inference.load_tagger(path, batch_size) for path in checkpoints]
    for path, tagger in zip(checkpoints[1:], taggers[1:]):
        for key in ("tags", "features", "normalisation"):
            if tagger.meta[key] != taggers[0].meta[key]:
                raise ValueError(f"{path} has other {key} than {checkpoints[0]}: their outputs cannot be averaged")
    return taggers


def read_features(path: str | Path, tagger: inference.Tagger) -> np.ndarray:
    """The (n_mels, frames) features of an audio file in the checkpoint's setting, resampled and mixed down as data
    preparation would; an unreadable file raises OSError or features.AudioError, naming it."""
    settings = features.FeatureSettings(**tagger.meta["features"])
    return features.audio_features(Path(path).read_bytes(), str(path), settings, resample=True)


def tag_file(
    path: Path, taggers: Sequence[inference.Tagger], window_frames: int
) -> tuple[np.ndarray, list[tuple[int, int, int]], np.ndarray]:
    """Probabilities (tags,) of one file, its windows (start, stop, weight) and their probabilities (windows, tags),
    averaged over the models."""
    return tag_spectrogram(read_features(path, taggers[0]), taggers, window_frames)


def tag_spectrogram(
    spectrogram: np.ndarray, taggers: Sequence[inference.Tagger], window_frames: int
) -> tuple[np.ndarray, list[tuple[int, int, int]], np.ndarray]:
    """`tag_file` of a track's (n_mels, frames) features."""
    track, windows = [], []
    for tagger in taggers:
        logits, weights = tagger.window_logits(spectrogram, window_frames)
        track.append(expit((logits * weights[:, None]).sum(axis=0) / weights.sum()))
        windows.append(expit(logits))
    ranges = input_pipeline.window_ranges(spectrogram.shape[1], window_frames)
    return np.mean(track, axis=0), ranges, np.mean(windows, axis=0)


def seconds_per_frame(tagger: inference.Tagger) -> float:
    """The time step of the checkpoint's features, for time axes."""
    settings = tagger.meta["features"]
    return settings["hop_length"] / settings["sample_rate"]


def short_name(tag: str) -> str:
    return tag.split(TAG_PREFIX_SEPARATOR)[-1]


def top_tags_line(path: str, probabilities: np.ndarray, tags: Sequence[str], top_k: int) -> str:
    """The line standard output shows for a file: its path and its top-k tags with their probabilities."""
    top = np.argsort(-probabilities)[:top_k]
    return f"{path}\t" + "  ".join(f"{short_name(tags[i])} {probabilities[i]:.3f}" for i in top)


def model_card(path: str) -> str:
    """What a checkpoint is, from its meta alone."""
    tagger = inference.load_tagger(path)
    meta = tagger.meta
    model, settings = meta["model"], meta["features"]
    frame_seconds = seconds_per_frame(tagger)
    lines = [
        f"checkpoint       {os.path.abspath(path)} ({meta['kind']}, step {meta['step']}, epoch {meta['epoch']:.2f})",
        f"model            {registry.describe(model)}",
    ]
    if registry.model_name(model) == "cp_resnet":
        lines.append(
            f"receptive field  {receptive_field.published_rf(model['rho'])} frames as published, "
            f"{receptive_field.exact_rf(model['rho'])} exact"
        )
    lines += [
        f"features         {settings['n_mels']} mel bands, {settings['sample_rate']} Hz, n_fft {settings['n_fft']}, "
        f"hop {settings['hop_length']}, {settings['order']}",
        f"window           {meta['window_frames']} frames ({meta['window_frames'] * frame_seconds:.1f} s)",
        f"training data    split {meta['dataset']['split_index']} of {meta['dataset']['config_name']}, "
        f"{meta['dataset']['training_tracks']} tracks, crops of {meta['dataset']['crop_frames']} frames, "
        f"batch {meta['dataset']['batch_size']}",
    ]
    if "validation" in meta:
        lines.append("validation       " + ", ".join(f"{k} {v:.4f}" for k, v in meta["validation"].items()))
    lines.append("tags             " + " ".join(short_name(tag) for tag in meta["tags"]))
    return "\n".join(lines)


def _write(output: Path, results: dict[str, np.ndarray], tags: list[str], top_k: int) -> None:
    if output.suffix == ".json":
        output.write_text(json.dumps({path: dict(zip(tags, p.tolist())) for path, p in results.items()}, indent=1))
        return
    with output.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *tags, "top_tags"])
        for path, probabilities in results.items():
            top = ";".join(short_name(tags[i]) for i in np.argsort(-probabilities)[:top_k])
            writer.writerow([path, *(f"{p:.6f}" for p in probabilities), top])


def _write_taggram(output: Path, taggrams: dict, tags: list[str], seconds_per_frame: float) -> None:
    """Per-window probabilities beside the output: `<stem>.taggram.csv` (path, window start/end in s, tags)."""
    with output.with_name(output.stem + ".taggram.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "start_s", "end_s", *tags])
        for path, (ranges, probabilities) in taggrams.items():
            for (start, stop, _), row in zip(ranges, probabilities):
                writer.writerow(
                    [
                        path,
                        f"{start * seconds_per_frame:.2f}",
                        f"{stop * seconds_per_frame:.2f}",
                        *(f"{p:.6f}" for p in row),
                    ]
                )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emorf_jax.predict", description=__doc__.split("\n")[0])
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
        taggers = load_taggers(args.checkpoint, args.batch_size)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    tags = taggers[0].tags
    window_frames = args.window_frames or taggers[0].window_frames
    results, taggrams, failed = {}, {}, 0
    for path in tqdm.tqdm(files, desc="tagging", unit="file", disable=args.no_progress, file=sys.stderr):
        try:
            probabilities, ranges, windows = tag_file(path, taggers, window_frames)
        except (OSError, ValueError) as error:  # features.AudioError is a ValueError
            reason = f"cannot read: {error.strerror}" if isinstance(error, OSError) and error.strerror else str(error)
            print(reason if str(path) in reason else f"{path}: {reason}", file=sys.stderr)
            failed += 1
            continue
        results[str(path)] = probabilities
        taggrams[str(path)] = (ranges, windows)
    frame_seconds = seconds_per_frame(taggers[0])
    if args.output:
        output = Path(args.output)
        _write(output, results, tags, args.top_k)
        if args.taggram:
            _write_taggram(output, taggrams, tags, frame_seconds)
    else:
        for path, probabilities in results.items():
            print(top_tags_line(path, probabilities, tags, args.top_k))
            if args.taggram:
                ranges, windows = taggrams[path]
                for (start, stop, _), row in zip(ranges, windows):
                    best = np.argsort(-row)[: args.top_k]
                    print(
                        f"  {start * frame_seconds:7.1f}-{stop * frame_seconds:7.1f} s  "
                        + "  ".join(f"{short_name(tags[i])} {row[i]:.3f}" for i in best)
                    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
