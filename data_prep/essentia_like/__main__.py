"""Writes organisers-style .npy mel-spectrograms of an audio tree in the MTG-Jamendo layout, so that the essentia96
feature setting (python -m data_prep.build --features essentia96) can be prepared where the organisers' files are
out of reach.

Every track of the split-0 TSVs becomes OUT/NN/ID.npy, float32 (96, frames), the format of the organisers'
precomputed features (12 kHz, frame 512, hop 256, 96 mel bands, dB). The values are librosa's mel power in dB, not
Essentia's own mel bands: the same shape, rate and scale, not the same numbers. A file that exists is kept, so an
interrupted run resumes.

Example:
  python -m data_prep.essentia_like --audio_dir SYNTH/audio --metadata_dir SYNTH/data --out SYNTH/npy
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_prep import worker_pool
from data_prep.essentia_like import write_essentia_like_tree


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.essentia_like",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--audio_dir", required=True, help="audio root: NN/ID.mp3 as in the TSVs")
    parser.add_argument("--metadata_dir", required=True, help="holds splits/split-0/*.tsv")
    parser.add_argument("--out", required=True, help="output root: NN/ID.npy")
    parser.add_argument("--workers", type=int, default=1, help="processes")
    args = parser.parse_args(argv)
    try:
        count = write_essentia_like_tree(args.audio_dir, args.metadata_dir, args.out, args.workers)
    except worker_pool.JobsFailed as error:
        sys.exit(f"error: {error}; the command run again makes only the missing files")
    print(f"{count} .npy files written under {args.out}")


if __name__ == "__main__":
    main()
