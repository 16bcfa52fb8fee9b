"""Checks prepared datasets: every TFRecord's checksums, the record index against the shards, the statistics.

Every record of every shard is read and its two checksums (of its length and of its data, masked CRC-32C as
TFRecord defines them) compared; the record index (record_index.npz) must list each shard's records, in order, each
spectrogram inside its record, as dataset_info.json counts them; the normalisation mean and std must be finite,
shaped as one frame, and the std positive; the counts in metadata.json must match the index. A damaged record is
named by its shard file and byte offset.

Exit status: 0 when every dataset is whole, 1 when something is damaged, 2 for a usage error (no prepared
dataset there).

Example:
  python -m data_prep.verify --data_dir DATA                 # every prepared dataset under DATA
  python -m data_prep.verify --data_dir DATA --features hop512 --split 0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from data_prep import layout, reader


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.verify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data_dir", required=True, help="the --data_dir of python -m data_prep.build")
    parser.add_argument("--features", default=None, help="only this feature setting (default: every one found)")
    parser.add_argument("--split", type=int, default=None, help="only this split (default: every one found)")
    args = parser.parse_args(argv)
    datasets = [
        (features, split)
        for features, split in reader.prepared_datasets(args.data_dir)
        if args.features in (None, features) and args.split in (None, split)
    ]
    if not datasets:
        parser.error(
            f"no prepared dataset{f' {args.features!r}' if args.features else ''}"
            f"{f' of split {args.split}' if args.split is not None else ''} under {args.data_dir}; give the "
            "--data_dir that python -m data_prep.build wrote"
        )
    damaged = 0
    for features, split in datasets:
        problems = reader.dataset_problems(args.data_dir, features, split)
        directory = layout.dataset_dir(args.data_dir, features, split)
        print(f"{'DAMAGED' if problems else 'ok'}: {directory}" + (f" ({len(problems)} problems)" if problems else ""))
        for problem in problems:
            print(f"  {problem}")
        damaged += bool(problems)
    if damaged:
        sys.exit(
            f"{damaged} of {len(datasets)} datasets damaged; delete each damaged dataset's folder and run "
            "python -m data_prep.build again (it reuses its feature cache)"
        )


if __name__ == "__main__":
    main()
