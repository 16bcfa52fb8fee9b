"""Prepares a dataset: MTG-Jamendo audio (or the organisers' .npy mels) into TFRecord shards for training.

Stage 1 caches every track's features under DATA_DIR/cache/FEATURES/ with a journal, in parallel and resumably:
a killed build started again redoes only the unfinished tracks. Stage 2 writes the shards of DATA_DIR/split-K/
from that cache. Every track of the split ends in the shards or in failures.tsv beside them, with its reason;
byte-identical input files are reported in duplicates.tsv and can be left out (--drop_duplicates).

Example:
  python -m data_prep.build --audio_dir AUDIO --metadata_dir MTG-JAMENDO/data --data_dir DATA --features hop512
"""

from __future__ import annotations

import argparse
import os
import sys

from data_prep import extras, preparation, worker_pool
from data_prep import features as features_lib


def parse_options(argv: list[str] | None = None) -> preparation.BuildOptions:
    settings = "\n".join(f"  {name:<15}{text}" for name, text in features_lib.CONFIG_DESCRIPTIONS.items())
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.build",
        description=f"{__doc__}\nFeature settings (--features):\n{settings}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--audio_dir", required=True, help="input root: NN/ID.mp3 (or NN/ID.npy for essentia96)")
    parser.add_argument("--metadata_dir", required=True, help="MTG-Jamendo data/ dir: TSVs, splits/, tags/")
    parser.add_argument("--data_dir", required=True, help="output: cache/, split-K/ with the TFDS shards")
    parser.add_argument(
        "--features", default="hop512", choices=tuple(features_lib.CONFIGS), help="feature setting (default: hop512)"
    )
    parser.add_argument("--split", type=int, default=0, help="split index (0 is the MediaEval 2019 split)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="extraction processes")
    parser.add_argument(
        "--drop_duplicates",
        default="none",
        choices=preparation.DUPLICATE_POLICIES,
        help="byte-identical files: report only, keep one copy (test > validation > train), drop all",
    )
    parser.add_argument("--retry_failed", action="store_true", help="extract failed tracks again")
    parser.add_argument(
        "--resample",
        action="store_true",
        help="resample other sample rates and (mono settings) mix down other channel counts instead of failing them",
    )
    parser.add_argument("--delete_cache", action="store_true", help="delete the feature cache after the build")
    parser.add_argument("--cache_dir", default=None, help="feature cache (default DATA_DIR/cache/FEATURES)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--chunk_frames",
        type=int,
        default=None,
        help="frames per stored chunk (default: the feature setting's, 20 s); training reads across chunks",
    )
    parser.add_argument(
        "--memory_budget_gb",
        type=float,
        default=worker_pool.DEFAULT_MEMORY_BUDGET_GB,
        help="bound on the workers' estimated memory; a longer track than it allows runs alone",
    )
    parser.add_argument(
        "--tracks_per_worker",
        type=int,
        default=worker_pool.DEFAULT_TRACKS_PER_WORKER,
        help="a worker is replaced after this many tracks, so that no process accumulates memory",
    )
    parser.add_argument(
        "--deadline_floor_s",
        type=float,
        default=worker_pool.DEFAULT_TRACK_DEADLINE.floor_s,
        help="a track's deadline: this floor, plus --deadline_s_per_audio_s per second of its TSV duration",
    )
    parser.add_argument(
        "--deadline_s_per_audio_s",
        type=float,
        default=worker_pool.DEFAULT_TRACK_DEADLINE.seconds_per_audio_second,
        help="a worker still holding a track past its deadline is killed and the track reported as timeout",
    )
    args = parser.parse_args(argv)
    try:
        return preparation.BuildOptions(
            audio_dir=args.audio_dir,
            metadata_dir=args.metadata_dir,
            data_dir=args.data_dir,
            features=args.features,
            split_index=args.split,
            workers=args.workers,
            drop_duplicates=args.drop_duplicates,
            retry_failed=args.retry_failed,
            delete_cache=args.delete_cache,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
            chunk_frames=args.chunk_frames,
            memory_budget_gb=args.memory_budget_gb,
            tracks_per_worker=args.tracks_per_worker,
            resample=args.resample,
            track_deadline=worker_pool.TrackDeadline(args.deadline_floor_s, args.deadline_s_per_audio_s),
        )
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    extras.exit_unless_installed(extras.TRAIN, "python -m data_prep.build")
    try:
        summary = preparation.build_dataset(options)
    except preparation.BuildError as error:
        sys.exit(f"error: {error}")
    print(summary)


if __name__ == "__main__":
    main()
