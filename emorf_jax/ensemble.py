"""Averaging the predictions of several models or snapshots (the authors' snapshot and multi-model ensembles), and
the command that turns any set of checkpoints or saved run reports into a MediaEval submission:

    python -m emorf_jax.ensemble --checkpoint=CKPT [--checkpoint=CKPT ...] [--predictions=REPORT_DIR ...]
                                 --data_dir=D --output_dir=OUT

CKPT: any checkpoint a run writes (snapshots, SWA, best; other seeds, ρ or variants with the same features);
each is run over the validation and test tracks of the prepared dataset in D (split and features from its meta).
REPORT_DIR: a model's folder of a run's report (`runs/demo/report/swa`), whose saved validation and test
predictions are used as they are. Writes to OUT: `predictions.npy` (float32, test tracks x tags, in the test TSV's
order), `decisions.npy` (`predictions > threshold`, strict), `thresholds.tsv` (per tag, F1-maximising on the
VALIDATION predictions), `validation_predictions.npy`, `track_ids.txt`, `metrics.json` (the ten official
figures), `per_tag.tsv` and `precision_recall.png`. A submission whose rows are not exactly the official test
tracks is refused, naming the missing ones.
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from numpy.typing import ArrayLike

from emorf_jax.metrics import as_score_matrix

SPLITS = ("validation", "test")


def average_predictions(predictions: Sequence[ArrayLike], weights: Sequence[float] | None = None) -> np.ndarray:
    """The (weighted) mean of per-tag probabilities over several (tracks, tags) prediction matrices.

    The authors "average the predictions" of snapshots and models; their ensembling code is not public, so
    whether they averaged probabilities or logits is unverified. Probabilities are averaged here: the runs
    they submitted are sigmoid outputs, and their ensemble run lies slightly closer to the probability mean of their
    two single-model runs than to the sigmoid of the logit mean. Inputs outside [0, 1] are refused, since
    they are most likely logits. `weights` default to equal; they need not sum to 1.
    """
    if len(predictions) == 0:
        raise ValueError("average_predictions needs at least one prediction matrix, got none")
    matrices = [as_score_matrix(matrix, f"predictions[{index}]") for index, matrix in enumerate(predictions)]
    for index, matrix in enumerate(matrices):
        if matrix.shape != matrices[0].shape:
            raise ValueError(
                f"predictions[{index}] shape {matrix.shape} does not match predictions[0] shape {matrices[0].shape}"
            )
        if matrix.min() < 0 or matrix.max() > 1:
            raise ValueError(
                f"predictions[{index}] has values in [{matrix.min():.4g}, {matrix.max():.4g}], outside the "
                "probabilities' [0, 1] (logits? apply a sigmoid first)"
            )
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(matrices),):
            raise ValueError(f"weights shape {weights.shape} does not match the {len(matrices)} prediction matrices")
        if np.any(~np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights.tolist()}")
    return np.average(np.stack(matrices), axis=0, weights=weights)


def _checkpoint_members(paths: Sequence[str], data_dir: str, batch_size: int) -> tuple[list[dict], object]:
    """Each checkpoint's {split: Predictions} over the prepared dataset its meta names, and that dataset."""
    from data_prep.reader import load_prepared
    from emorf_jax import checkpoints, inference
    from emorf_jax.models import registry

    members, prepared, first_meta = [], None, None
    for path in paths:
        variables, meta = checkpoints.load_checkpoint(path)
        if first_meta is None:
            first_meta = meta
            prepared = load_prepared(data_dir, meta["dataset"]["config_name"], meta["dataset"]["split_index"])
        for key in ("tags", "features", "normalisation"):
            if meta[key] != first_meta[key]:
                raise ValueError(f"{path} has other {key} than {paths[0]}: their outputs cannot be averaged")
        predictor = inference.Predictor(
            registry.build(meta["model"]), prepared, window_frames=meta["window_frames"], batch_size=batch_size
        )
        members.append({split: predictor.predict(variables, split) for split in SPLITS})
    return members, prepared


def _report_member(directory: str) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{split: (probabilities, track ids)} from a model's folder of a run's report."""
    folder = Path(directory)
    member = {}
    for split in SPLITS:
        ids_file = folder.parent / f"{split}_track_ids.txt"
        matrix_file = folder / f"{split}_predictions.npy"
        if not ids_file.exists() or not matrix_file.exists():
            raise FileNotFoundError(
                f"{directory} is not a model folder of a run report: {matrix_file.name} or {ids_file} is missing"
            )
        member[split] = (np.load(matrix_file), ids_file.read_text().split())
    return member


def write_ensemble(
    output_dir: str,
    tags: Sequence[str],
    members: Sequence[dict[str, tuple[np.ndarray, list[str]]]],
    labels: dict[str, np.ndarray],
    official_test_ids: Sequence[str],
) -> dict[str, float]:
    """Averages the members, chooses thresholds on validation, writes the submission and its reports."""
    from emorf_jax import evaluate, metrics, submission

    averaged = {}
    for split in SPLITS:
        rows = members[0][split][1]
        for number, member in enumerate(members[1:], start=2):
            if member[split][1] != rows:
                raise ValueError(f"member {number} has other {split} rows than member 1: they cannot be averaged")
        # float32, as saved: thresholds and decisions are computed from exactly the numbers in the files.
        averaged[split] = (average_predictions([member[split][0] for member in members]).astype(np.float32), rows)
    validation, validation_ids = averaged["validation"]
    test, test_ids = averaged["test"]
    submission.check_rows(test_ids, official_test_ids)
    thresholds = metrics.best_f1_thresholds(labels["validation"], validation)
    decisions = metrics.decide(test, thresholds)
    submission.write_submission(output_dir, test, decisions, test_ids, official_test_ids)
    out = Path(output_dir)
    np.save(out / "validation_predictions.npy", validation)
    (out / "track_ids.txt").write_text("".join(f"{track_id}\n" for track_id in test_ids))
    (out / "validation_track_ids.txt").write_text("".join(f"{track_id}\n" for track_id in validation_ids))
    evaluate.write_thresholds(out / "thresholds.tsv", tags, thresholds)
    figures = metrics.mediaeval_metrics(labels["test"], test, decisions)
    (out / "metrics.json").write_text(json.dumps(figures, indent=2))
    _write_per_tag(out / "per_tag.tsv", tags, labels["test"], test, decisions, thresholds)
    _plot_precision_recall(out / "precision_recall.png", tags, labels["test"], test, figures)
    return figures


def _write_per_tag(
    path: Path,
    tags: Sequence[str],
    truth: np.ndarray,
    scores: np.ndarray,
    decisions: np.ndarray,
    thresholds: np.ndarray,
) -> None:
    from sklearn import metrics as sk_metrics

    from emorf_jax import metrics

    pr_auc = metrics.per_tag_pr_auc(truth, scores)
    precision, recall, f1, _ = sk_metrics.precision_recall_fscore_support(
        truth, decisions, average=None, zero_division=0.0
    )
    lines = ["tag\tpositives\tPR-AUC\tROC-AUC\tthreshold\tprecision\trecall\tF-score"]
    for index, tag in enumerate(tags):
        both = 0 < truth[:, index].sum() < len(truth)
        roc = sk_metrics.roc_auc_score(truth[:, index], scores[:, index]) if both else float("nan")
        lines.append(
            f"{tag}\t{int(truth[:, index].sum())}\t{pr_auc[index]:.6f}\t{roc:.6f}\t{thresholds[index]:.6g}"
            f"\t{precision[index]:.6f}\t{recall[index]:.6f}\t{f1[index]:.6f}"
        )
    path.write_text("\n".join(lines) + "\n")


def _plot_precision_recall(
    path: Path, tags: Sequence[str], truth: np.ndarray, scores: np.ndarray, figures: dict[str, float]
) -> None:
    """Every tag's precision-recall curve (thin) and the micro-averaged one (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from sklearn import metrics as sk_metrics

    figure, axes = pyplot.subplots(figsize=(6, 5))
    for index in range(len(tags)):
        if truth[:, index].any():
            precision, recall, _ = sk_metrics.precision_recall_curve(truth[:, index], scores[:, index])
            axes.plot(recall, precision, color="#8db3d9", linewidth=0.6, alpha=0.6)
    precision, recall, _ = sk_metrics.precision_recall_curve(truth.ravel(), scores.ravel())
    axes.plot(
        recall, precision, color="black", linewidth=2, label=f"micro average (PR-AUC {figures['PR-AUC-micro']:.4f})"
    )
    axes.plot([], [], color="#8db3d9", label=f"each tag (macro PR-AUC {figures['PR-AUC-macro']:.4f})")
    axes.axhline(truth.mean(), color="grey", linestyle=":", label=f"positive rate {truth.mean():.4f}")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Test set, ensemble")
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emorf_jax.ensemble", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", action="append", default=[], help="a checkpoint directory (repeatable)")
    parser.add_argument(
        "--predictions",
        action="append",
        default=[],
        help="a model folder of a run report, e.g. runs/demo/report/swa (repeatable)",
    )
    parser.add_argument("--data_dir", required=True, help="the prepared dataset (labels and official rows)")
    parser.add_argument("--config", default=None, help="its feature setting when only --predictions are given")
    parser.add_argument("--split", type=int, default=0, help="its split when only --predictions are given")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=8, help="windows per evaluation step")
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.predictions:
        parser.error("give at least one --checkpoint or --predictions")
    from data_prep.reader import load_prepared

    try:
        members = []
        prepared = None
        if args.checkpoint:
            checkpoint_members, prepared = _checkpoint_members(args.checkpoint, args.data_dir, args.batch_size)
            members += [
                {split: (p[split].probabilities, list(p[split].track_ids)) for split in SPLITS}
                for p in checkpoint_members
            ]
        if prepared is None:
            prepared = load_prepared(args.data_dir, args.config or "hop512", args.split)
        members += [_report_member(directory) for directory in args.predictions]
        labels = {split: prepared.parts[split].labels for split in SPLITS}
        figures = write_ensemble(args.output_dir, prepared.tags, members, labels, prepared.tsv_track_ids["test"])
    except (FileNotFoundError, ValueError) as error:
        print(f"python -m emorf_jax.ensemble: error: {error}", file=sys.stderr)
        return 2
    print(f"{len(members)} members -> {args.output_dir}")
    print("\n".join(f"{name:<16}{value:.6f}" for name, value in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
