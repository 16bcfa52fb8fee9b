"""Writes a synthetic MTG-Jamendo: real MP3s (44.1 kHz stereo) and metadata in the real dataset's layout, with nine
mood/theme tags planted in the audio (or, with --subset, nine tags of the genre, instrument or top-50 subset), for
running the whole pipeline where the real audio is out of reach.

OUT/audio/NN/ID.mp3 holds the tracks; OUT/data/ the full TSV, the artist-disjoint split-0 TSVs and the tag lists.
Track lengths spread like the real ones around the median --duration; --duplicate_groups pairs of byte-identical
MP3s with different tags copy a quality issue of the real data. The same arguments give byte-identical files.

Example:
  python -m data_prep.synthetic --out runs/synthetic --tracks 300 --seed 0
  python -m data_prep.synthetic --out runs/synthetic-genre --tracks 300 --seed 0 --subset genre
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_prep import metadata, worker_pool
from data_prep.synthetic import LENGTH_LOG_STD, make_synthetic


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory (gets audio/ and data/)")
    parser.add_argument("--tracks", type=int, default=300, help="number of tracks in the full TSV")
    parser.add_argument("--seed", type=int, default=0, help="random seed: tags, lengths, artists, split and audio")
    parser.add_argument("--duration", type=float, default=6.0, help="median track length in seconds")
    parser.add_argument(
        "--length_log_std",
        type=float,
        default=LENGTH_LOG_STD,
        help="spread of log(length); the real data's by default, 0 for equal lengths",
    )
    parser.add_argument("--long_tracks", type=int, default=0, help="extra tracks of 30-50 s")
    parser.add_argument("--duplicate_groups", type=int, default=2, help="pairs of byte-identical MP3s")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, at most 8)")
    parser.add_argument(
        "--subset",
        default=metadata.DEFAULT_SUBSET,
        choices=metadata.SUBSETS,
        help="the MTG-Jamendo subset whose tag and file names the tree takes (default: moodtheme)",
    )
    args = parser.parse_args(argv)
    try:
        make_synthetic(
            args.out,
            num_tracks=args.tracks,
            seed=args.seed,
            duration=args.duration,
            long_tracks=args.long_tracks,
            duplicate_groups=args.duplicate_groups,
            workers=args.workers,
            length_log_std=args.length_log_std,
            subset=args.subset,
        )
    except worker_pool.JobsFailed as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
