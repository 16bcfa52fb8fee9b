"""Prepares a dataset: MTG-Jamendo audio (or the organisers' .npy mels) into TFRecord shards for training.

Stage 1 caches every track's features under DATA_DIR/cache/FEATURES/ with a journal, in parallel and resumably:
a killed build started again redoes only the unfinished tracks. Stage 2 writes the shards of DATA_DIR/split-K/
from that cache. Every track of the split ends in the shards or in failures.tsv beside them, with its reason;
byte-identical input files are reported in duplicates.tsv and can be left out (--drop_duplicates).

--subset picks MTG-Jamendo's auto-tagging subset (moodtheme, genre, instrument, top50tags), whose tags the shards
store; --tags_csv builds your own collection instead: a CSV (or TSV) of path,tags[,split][,artist] rows, tags
separated by ';', paths relative to --audio_dir. Without a split column the collection is split reproducibly
(--split_seed, --split_fractions), artist-disjoint, with each tag spread over the parts; the split and the tags are
written in MTG-Jamendo's layout into DATA/collection/, and tags too rare to train and score are reported and left out.
One data dir holds one tag set.

Examples:
  python -m data_prep.build --audio_dir AUDIO --metadata_dir MTG-JAMENDO/data --data_dir DATA --features hop512
  python -m data_prep.build --audio_dir AUDIO --metadata_dir MTG-JAMENDO/data --data_dir DATA-GENRE --subset genre
  python -m data_prep.build --audio_dir MUSIC --tags_csv tags.csv --data_dir DATA-MINE
"""

from __future__ import annotations

import argparse
import os
import sys

from data_prep import collection, extras, metadata, preparation, worker_pool
from data_prep import features as features_lib
from data_prep.deadline import DEFAULT_DEADLINE, Deadline


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three fractions such as 0.8,0.1,0.1") from None


def parse_options(argv: list[str] | None = None) -> preparation.BuildOptions:
    settings = "\n".join(f"  {name:<15}{text}" for name, text in features_lib.CONFIG_DESCRIPTIONS.items())
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.build",
        description=f"{__doc__}\nFeature settings (--features):\n{settings}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--audio_dir", required=True, help="input root: NN/ID.mp3 (or NN/ID.npy for essentia96), or a collection's"
    )
    parser.add_argument("--metadata_dir", help="MTG-Jamendo data/ dir: TSVs, splits/, tags/")
    parser.add_argument(
        "--subset",
        default=metadata.DEFAULT_SUBSET,
        choices=metadata.SUBSETS,
        help="MTG-Jamendo's auto-tagging subset: its TSVs and tags (default: moodtheme)",
    )
    parser.add_argument("--tags_csv", help="your own collection instead of --metadata_dir: path,tags[,split][,artist]")
    parser.add_argument(
        "--split_fractions",
        type=_fractions,
        default=collection.DEFAULT_FRACTIONS,
        help="a collection without a split column: train,validation,test fractions (default 0.8,0.1,0.1)",
    )
    parser.add_argument("--split_seed", type=int, default=0, help="a collection's split: its seed (default 0)")
    parser.add_argument(
        "--min_tag_tracks",
        type=int,
        default=1,
        help="a collection's tag is left out unless train, validation and test each hold this many of its tracks",
    )
    parser.add_argument("--keep_rare_tags", action="store_true", help="keep a collection's rare tags all the same")
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
        default=DEFAULT_DEADLINE.floor_s,
        help="a track's deadline: this floor, plus --deadline_s_per_audio_s per second of its TSV duration",
    )
    parser.add_argument(
        "--deadline_s_per_audio_s",
        type=float,
        default=DEFAULT_DEADLINE.seconds_per_audio_second,
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
            track_deadline=Deadline(args.deadline_floor_s, args.deadline_s_per_audio_s),
            subset=args.subset,
            tags_csv=args.tags_csv,
            split_fractions=args.split_fractions,
            split_seed=args.split_seed,
            min_tag_tracks=args.min_tag_tracks,
            keep_rare_tags=args.keep_rare_tags,
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
