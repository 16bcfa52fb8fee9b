"""Command line: the official MediaEval 2019 figures of a predictions file, as a table or JSON, and a plot.

    python -m emorf_jax.evaluate --groundtruth G.npy --predictions P.npy [--decisions D.npy | --thresholds T.txt]
                                 [--json] [--plot per_tag.png] [--metadata-dir DIR]
    python -m emorf_jax.evaluate --groundtruth G.npy --popularity --metadata-dir DIR [--split K] [--json]

`--popularity` scores the organisers' "popular" baseline instead of a file: every test track gets the most
frequent tag of the split's TRAINING tracks, as both its prediction (1, other tags 0) and its decision.

Files are the task's submission format: `.npy` matrices (tracks, tags), rows in the test TSV's order, columns
in `moodtheme_split.txt` order. A thresholds file is the organisers' format: `tag<TAB>threshold` per line, in
column order; decisions are then `predictions > threshold`.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_prep import metadata
from emorf_jax import metrics

TAG_PREFIX_SEPARATOR = "---"  # Tags read like "mood/theme---happy"; plots show "happy".


def read_thresholds(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Tag names and thresholds from a `tag<TAB>threshold` file (the organisers' thresholds.txt format)."""
    tags, thresholds = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        try:
            if len(fields) != 2:
                raise ValueError(f"expected 2 tab-separated fields, got {len(fields)}")
            thresholds.append(float(fields[1]))
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: {error}: {line!r}") from None
        tags.append(fields[0])
    if not tags:
        raise ValueError(f"{path} holds no thresholds")
    return tags, np.array(thresholds)


def write_thresholds(path: str | Path, tags: Sequence[str], thresholds: np.ndarray) -> None:
    """Write per-tag thresholds in the organisers' format; `repr` keeps every digit, so decisions survive."""
    if len(tags) != len(thresholds):
        raise ValueError(f"{len(tags)} tags but {len(thresholds)} thresholds")
    lines = [f"{tag}\t{float(threshold)!r}\n" for tag, threshold in zip(tags, thresholds)]
    Path(path).write_text("".join(lines), encoding="utf-8")


def popular_tag(train_labels: np.ndarray) -> int:
    """The column of the most frequent tag of (tracks, tags) training labels (the first one on a tie)."""
    counts = np.asarray(train_labels, dtype=bool).sum(axis=0)
    return int(np.argmax(counts))


def popularity_baseline(train_labels: np.ndarray, num_tracks: int) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, decisions) of the organisers' "popular" baseline for `num_tracks` test tracks: 1 / True for
    the most frequent training tag, 0 / False for every other; with these the official row is reproduced to 6
    decimals (tests/test_baselines.py)."""
    decisions = np.zeros((num_tracks, np.shape(train_labels)[1]), dtype=bool)
    decisions[:, popular_tag(train_labels)] = True
    return decisions.astype(np.float32), decisions


def split_labels(metadata_dir: str | Path, split_index: int, part: str) -> np.ndarray:
    """(tracks, tags) bool labels of one part of a split, rows in its TSV's order, columns in the tag list's."""
    tags = metadata.read_tag_list(metadata_dir)
    return np.array(
        [metadata.track_labels(track, tags) for track in metadata.read_split(metadata_dir, split_index, part)],
        dtype=bool,
    )


def format_table(figures: dict[str, float]) -> str:
    """One `name  value` line per figure, names padded so that the values line up."""
    width = max(len(name) for name in figures)
    return "\n".join(f"{name:<{width}}  {value:.6f}" for name, value in figures.items())


def plot_per_tag_pr_auc(
    groundtruth: np.ndarray, predictions: np.ndarray, tags: Sequence[str], path: str | Path
) -> None:
    """Horizontal bars of each tag's PR-AUC, best first, each with the tag's positive rate marked.

    The positive rate is the PR-AUC of a constant predictor, so a bar that barely passes its mark shows a tag
    the model hardly ranks better than chance.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    pr_auc = metrics.per_tag_pr_auc(groundtruth, predictions)
    positive_rate = np.asarray(groundtruth, dtype=bool).mean(axis=0)
    order = np.argsort(-np.nan_to_num(pr_auc, nan=-1.0), kind="stable")
    positions = np.arange(len(order))
    labels = [tags[index].split(TAG_PREFIX_SEPARATOR)[-1] for index in order]

    figure, axes = pyplot.subplots(figsize=(7, 2 + 0.19 * len(order)))
    axes.barh(positions, pr_auc[order], color="#8db3d9", label="PR-AUC (average precision)")
    axes.scatter(
        positive_rate[order],
        positions,
        marker="|",
        s=120,
        color="black",
        zorder=3,
        label="positive rate (a constant predictor's PR-AUC)",
    )
    axes.set_yticks(positions, labels, fontsize=8)
    axes.set_ylim(len(order) - 0.5, -0.5)
    axes.set_xlim(0, 1)
    axes.set_xlabel("PR-AUC")
    axes.set_title(
        f"Per-tag PR-AUC (macro {np.nanmean(pr_auc):.4f}, mean positive rate {positive_rate.mean():.4f})",
        fontsize=10,
    )
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emorf_jax.evaluate",
        description="The official MediaEval 2019 Emotion and Theme figures of a predictions matrix.",
    )
    parser.add_argument("--groundtruth", required=True, help="bool .npy (tracks, tags)")
    parser.add_argument("--predictions", help="float .npy (tracks, tags), e.g. probabilities")
    parser.add_argument(
        "--popularity",
        action="store_true",
        help="score the 'popular' baseline (needs --metadata-dir) instead of --predictions",
    )
    parser.add_argument("--split", type=int, default=0, help="the split whose training tracks --popularity counts")
    decisions = parser.add_mutually_exclusive_group()
    decisions.add_argument("--decisions", help="bool .npy (tracks, tags); without it (or --thresholds) only AUCs")
    decisions.add_argument("--thresholds", help="tag<TAB>threshold per line; decisions are predictions > threshold")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--plot", help="write a PNG bar chart of per-tag PR-AUC to this path")
    parser.add_argument(
        "--metadata-dir",
        help="MTG-Jamendo data/ folder, for the plot's tag names (default: from --thresholds, else numbers) and "
        "for --popularity",
    )
    return parser


def _load_matrix(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:  # numpy's message for a non-.npy file talks about pickles
        raise ValueError(f"{path} is not a .npy matrix ({error})") from None


def _tag_names(args: argparse.Namespace, threshold_tags: list[str] | None, n_tags: int) -> list[str]:
    if args.metadata_dir:
        names = list(metadata.read_tag_list(args.metadata_dir))
    elif threshold_tags is not None:
        names = threshold_tags
    else:
        return [f"tag {index}" for index in range(n_tags)]
    if len(names) != n_tags:
        raise ValueError(f"{len(names)} tag names but the matrices have {n_tags} tags")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.popularity and (args.predictions or args.decisions or args.thresholds or not args.metadata_dir):
        parser.error("--popularity takes --metadata-dir and no --predictions, --decisions or --thresholds")
    if not args.popularity and not args.predictions:
        parser.error("give --predictions (or --popularity)")
    try:
        groundtruth = _load_matrix(args.groundtruth)
        decisions, threshold_tags = None, None
        if args.popularity:
            train_labels = split_labels(args.metadata_dir, args.split, "train")
            predictions, decisions = popularity_baseline(train_labels, len(groundtruth))
        else:
            predictions = _load_matrix(args.predictions)
        if args.decisions:
            decisions = _load_matrix(args.decisions)
        elif args.thresholds:
            threshold_tags, thresholds = read_thresholds(args.thresholds)
            decisions = metrics.decide(predictions, thresholds)
        figures = metrics.mediaeval_metrics(groundtruth, predictions, decisions)
        if args.plot:
            plot_per_tag_pr_auc(
                groundtruth, predictions, _tag_names(args, threshold_tags, groundtruth.shape[1]), args.plot
            )
    except (OSError, ValueError) as error:
        parser.error(str(error))
    print(json.dumps(figures, indent=2) if args.json else format_table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
