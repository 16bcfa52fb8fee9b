"""The official MediaEval 2019 Emotion and Theme figures of a predictions matrix, as a table or JSON, and a plot.

    python -m emorf_jax.evaluate --groundtruth G.npy --predictions P.npy [--decisions D.npy | --thresholds T.txt]
                                 [--calibration] [--json] [--plot per_tag.png] [--metadata_dir DIR [--subset S]]
    python -m emorf_jax.evaluate --groundtruth G.npy --popularity --metadata_dir DIR [--split K] [--subset S]
                                 [--json]

`--popularity` scores the organisers' "popular" baseline instead of a file: every test track gets the most
frequent tag of the split's TRAINING tracks, as both its prediction (1, other tags 0) and its decision.

Files are the task's submission format: `.npy` matrices (tracks, tags), rows in the test TSV's order, columns in the tag
list's order (for mood/theme `moodtheme_split.txt`; --subset names another MTG-Jamendo subset or a collection that
`data_prep.build --tags_csv` wrote). A thresholds file is the organisers' format: `tag<TAB>threshold` per line, in
column order; decisions are then `predictions > threshold`. Without decisions or thresholds only the four AUC figures
are given.

`--calibration` adds how far the probabilities are from the frequencies they predict (`metrics.calibration`): their
mean beside the positive rate, the median over tags of odds(mean probability) / odds(positive rate), and the logistic
fit P(truth) = sigmoid(intercept + slope * logit(probability)), (0, 1) when calibrated; with `--json`, under the key
"calibration". Probabilities outside [0, 1] are refused.
"""

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from data_prep import metadata
from emorf_jax import baselines, metrics, report, thresholds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emorf_jax.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--groundtruth", required=True, help="bool .npy (tracks, tags)")
    parser.add_argument("--predictions", help="float .npy (tracks, tags), e.g. probabilities")
    parser.add_argument(
        "--popularity",
        action="store_true",
        help="score the 'popular' baseline (needs --metadata_dir) instead of --predictions",
    )
    parser.add_argument("--split", type=int, default=0, help="the split whose training tracks --popularity counts")
    parser.add_argument(
        "--subset",
        choices=(*metadata.SUBSETS, metadata.COLLECTION),
        default=metadata.DEFAULT_SUBSET,
        help="the --metadata_dir's subset: its tag list names the columns (default: moodtheme)",
    )
    decisions = parser.add_mutually_exclusive_group()
    decisions.add_argument("--decisions", help="bool .npy (tracks, tags); without it (or --thresholds) only AUCs")
    decisions.add_argument("--thresholds", help="tag<TAB>threshold per line; decisions are predictions > threshold")
    parser.add_argument(
        "--calibration",
        action="store_true",
        help="also print the probabilities' calibration (mean vs positive rate, median odds ratio, logistic fit)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--plot", help="write a PNG bar chart of per-tag PR-AUC to this path")
    parser.add_argument(
        "--metadata_dir",
        help="MTG-Jamendo data/ folder, for the plot's tag names (default: from --thresholds, else numbers) and "
        "for --popularity",
    )
    return parser


def _load_matrix(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:  # numpy's message for a non-.npy file talks about pickles
        raise ValueError(f"{path} is not a .npy matrix ({error})") from None


def _tag_names(args: argparse.Namespace, threshold_tags: list[str] | None, n_tags: int) -> list[str] | None:
    """The columns' tags, from --metadata_dir or --thresholds, for warnings and the plot; None when neither is given."""
    if args.metadata_dir:
        names = list(metadata.read_tag_list(args.metadata_dir, args.subset, args.split))
    elif threshold_tags is not None:
        names = threshold_tags
    else:
        return None
    if len(names) != n_tags:
        raise ValueError(f"{len(names)} tag names but the matrices have {n_tags} tags")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.popularity and (args.predictions or args.decisions or args.thresholds or not args.metadata_dir):
        parser.error("--popularity takes --metadata_dir and no --predictions, --decisions or --thresholds")
    if not args.popularity and not args.predictions:
        parser.error("give --predictions (or --popularity)")
    try:
        groundtruth = _load_matrix(args.groundtruth)
        decisions, threshold_tags = None, None
        if args.popularity:
            train_labels = metadata.split_labels(args.metadata_dir, args.split, "train", args.subset)
            predictions, decisions = baselines.popularity_baseline(train_labels, len(groundtruth))
        else:
            predictions = _load_matrix(args.predictions)
        if args.decisions:
            decisions = _load_matrix(args.decisions)
        elif args.thresholds:
            threshold_tags, values = thresholds.read(args.thresholds)
            decisions = metrics.decide(predictions, values)
        metrics.as_label_matrix(groundtruth, "groundtruth")  # a (tracks, tags) matrix, before its tags are named
        names = _tag_names(args, threshold_tags, groundtruth.shape[1])
        figures = metrics.mediaeval_metrics(groundtruth, predictions, decisions, names)
        calibration = metrics.calibration(groundtruth, predictions, names) if args.calibration else None
        if args.plot:
            numbered = [f"tag {index}" for index in range(groundtruth.shape[1])]
            report.plot_per_tag_pr_auc(groundtruth, predictions, names or numbered, args.plot)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if args.json:
        print(json.dumps(figures if calibration is None else figures | {"calibration": calibration}, indent=2))
    else:
        print(report.format_table(figures if calibration is None else figures | calibration))
    return 0


if __name__ == "__main__":
    sys.exit(main())
