"""Averages any set of checkpoints and saved model reports into one model's report and MediaEval submission.

    python -m emorf_jax.ensemble --checkpoint=CKPT [--checkpoint=CKPT ...] [--predictions=MODEL_DIR ...]
                                 --data_dir=D --output_dir=OUT

CKPT: any checkpoint a run writes (snapshots, SWA, best; other seeds, rho or variants with the same features);
each is run over the validation and test tracks of the prepared dataset in D (features and split from its meta;
with --predictions only, from --features and --split). MODEL_DIR: a model's folder of a report, such as a training
run's `runs/demo/report/swa` or another ensemble's OUT, whose saved validation and test predictions are used as
they are. The members' probabilities are averaged; per-tag thresholds are chosen on the VALIDATION average
(F1-maximising) and decide the test average (`predictions > threshold`, strict).

OUT gets the report of one model (`emorf_jax/report.py`): `submission/predictions.npy` and
`submission/decisions.npy` (the MediaEval submission: float32 and bool, test tracks x tags, in the test TSV's
order), `test_predictions.npy`, `test_decisions.npy`, `validation_predictions.npy`, their rows in
`test_track_ids.txt` and `validation_track_ids.txt`, `thresholds.tsv` (the ensemble's per-tag decision thresholds,
chosen on its averaged validation predictions: the ones to decide its members' averaged probabilities with, where each
member checkpoint's meta holds its own), `metrics.json` (the ten official figures),
`calibration.json` (the test probabilities' calibration, `metrics.calibration`), `per_tag.tsv` and
`precision_recall.png`; the figures and the calibration are also printed. An ensemble whose test rows are not exactly
the official test tracks is refused before any model runs, naming the missing ones (and, for tracks that data
preparation could not store, its failures.tsv).
"""

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from data_prep import features
from emorf_jax import ensemble, report

PROG = "python -m emorf_jax.ensemble"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", action="append", default=[], help="a checkpoint directory (repeatable)")
    parser.add_argument(
        "--predictions",
        action="append",
        default=[],
        help="a model folder of a report, e.g. runs/demo/report/swa (repeatable)",
    )
    parser.add_argument("--data_dir", required=True, help="the prepared dataset (labels and official rows)")
    parser.add_argument(
        "--features",
        default="hop512",
        choices=tuple(features.CONFIGS),
        help="its feature setting when only --predictions are given",
    )
    parser.add_argument("--split", type=int, default=0, help="its split when only --predictions are given")
    parser.add_argument("--output_dir", required=True, help="the ensemble's report and submission go here")
    parser.add_argument("--batch_size", type=int, default=8, help="windows per evaluation step")
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.predictions:
        parser.error("give at least one --checkpoint or --predictions")
    try:
        members, prepared = ensemble.collect_members(
            args.data_dir,
            checkpoint_paths=args.checkpoint,
            report_folders=args.predictions,
            features=args.features,
            split_index=args.split,
            batch_size=args.batch_size,
        )
        averaged = ensemble.write_ensemble(args.output_dir, members, prepared)
    except (OSError, ValueError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(members)} members -> {args.output_dir}")
    print(report.format_table(averaged.figures | averaged.calibration))
    return 0


if __name__ == "__main__":
    sys.exit(main())
