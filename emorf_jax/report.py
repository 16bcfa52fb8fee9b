"""A model's test report, one layout whether a training run or the ensemble tool writes it.

Per-tag thresholds are chosen on the VALIDATION predictions (F1-maximising, `metrics.best_f1_thresholds`); the test
predictions decided by them give the ten official figures. One model's folder holds:

    validation_predictions.npy, test_predictions.npy  float32 (tracks, tags), exactly the numbers the figures and
                                                      thresholds were computed from
    validation_track_ids.txt, test_track_ids.txt      their rows, one track id a line
    test_decisions.npy                                bool (tracks, tags): test predictions > threshold (strict)
    thresholds.tsv                                    tag<TAB>threshold per line (the organisers' format)
    metrics.json                                      the ten official figures on the test set
    calibration.json                                  the test probabilities' calibration (`metrics.calibration`)
    per_tag.tsv                                       each tag's positives, PR-AUC, ROC-AUC, threshold, precision,
                                                      recall and F-score
    precision_recall.png                              every tag's precision-recall curve and the micro average
    submission/{predictions,decisions}.npy            the MediaEval submission (`submission.write_submission`),
                                                      only when the test rows are exactly the official test tracks

A training run writes one such folder per model in `<workdir>/report/`, beside `test_report.json`, its summary: per
model its `metrics.json` figures with its calibration under the key "calibration", then a constant predictor's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from sklearn import metrics as sk_metrics

from data_prep import metadata
from emorf_jax import baselines, metrics, submission, thresholds

if TYPE_CHECKING:
    from emorf_jax.split_predictions import Predictions

SPLITS = ("validation", "test")
RUN_REPORT_DIR = "report"  # in a training run's workdir
RUN_SUMMARY = "test_report.json"  # in RUN_REPORT_DIR


@dataclasses.dataclass(frozen=True)
class ModelReport:
    """One model's predictions on both splits and what its validation thresholds decide on the test set."""

    name: str  # "final", "swa", "ensemble", ...: the plot's title names it
    tags: tuple[str, ...]
    validation: Predictions  # probabilities in float32, as saved
    test: Predictions
    thresholds: np.ndarray  # (tags,), chosen on validation
    decisions: np.ndarray  # (test tracks, tags) bool
    figures: dict[str, float]  # the ten official figures on the test set
    calibration: dict[str, float]  # `metrics.calibration` of the test set


def model_report(name: str, tags: Sequence[str], validation: Predictions, test: Predictions) -> ModelReport:
    """Thresholds from validation, the test set decided by them, and its figures.

    The probabilities become float32 first, as they are saved: thresholds and decisions are computed from exactly
    the numbers in the files, so that anyone who reloads them gets the same decisions.
    """
    validation, test = (
        dataclasses.replace(split, probabilities=np.asarray(split.probabilities, np.float32))
        for split in (validation, test)
    )
    thresholds = validation_thresholds(validation, tags)
    decisions = metrics.decide(test.probabilities, thresholds)
    figures = metrics.mediaeval_metrics(test.labels, test.probabilities, decisions, tags)
    calibration = metrics.calibration(test.labels, test.probabilities, tags)
    return ModelReport(name, tuple(tags), validation, test, thresholds, decisions, figures, calibration)


def validation_thresholds(validation: Predictions, tags: Sequence[str] | None = None) -> np.ndarray:
    """Per-tag thresholds chosen on validation predictions (F1-maximising), from their float32 probabilities as a
    report saves them; inf for a tag without a positive track (named in the warning by `tags`)."""
    return metrics.best_f1_thresholds(validation.labels, np.asarray(validation.probabilities, np.float32), tags)


def write_model_report(directory: str | Path, report: ModelReport, official_test_ids: Sequence[str]) -> None:
    """Writes the model's folder (see the module docstring); the submission only if the test rows are official."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        predictions = getattr(report, split)
        np.save(folder / f"{split}_predictions.npy", predictions.probabilities)
        (folder / f"{split}_track_ids.txt").write_text("".join(f"{track_id}\n" for track_id in predictions.track_ids))
    np.save(folder / "test_decisions.npy", report.decisions)
    thresholds.write(folder / "thresholds.tsv", report.tags, report.thresholds)
    (folder / "metrics.json").write_text(json.dumps(report.figures, indent=2))
    (folder / "calibration.json").write_text(json.dumps(report.calibration, indent=2))
    _write_per_tag(folder / "per_tag.tsv", report)
    _plot_precision_recall(folder / "precision_recall.png", report)
    if list(report.test.track_ids) == list(official_test_ids):
        submission.write_submission(
            str(folder / "submission"),
            report.test.probabilities,
            report.decisions,
            report.test.track_ids,
            official_test_ids,
        )


def read_model_predictions(directory: str | Path) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{split: (probabilities, track ids)} of a model's folder, as `write_model_report` wrote them."""
    folder = Path(directory)
    saved = {}
    for split in SPLITS:
        matrix_file, ids_file = folder / f"{split}_predictions.npy", folder / f"{split}_track_ids.txt"
        for path in (matrix_file, ids_file):
            if not path.is_file():
                raise FileNotFoundError(f"{directory} is not a model folder of a report: {path.name} is missing")
        saved[split] = (np.load(matrix_file), ids_file.read_text().split())
    return saved


def run_summary(reports: Mapping[str, ModelReport]) -> dict[str, dict]:
    """The test figures and calibration of every model of a training run, then a constant predictor's figures to set
    them beside (scored on the same tags: `baselines.constant_predictor_figures`)."""
    summary = {name: report.figures | {"calibration": report.calibration} for name, report in reports.items()}
    summary["constant_predictor"] = baselines.constant_predictor_figures(next(iter(reports.values())).test.labels)
    return summary


def write_run_report(workdir: str, reports: Mapping[str, ModelReport], official_test_ids: Sequence[str]) -> None:
    """A training run's `report/`: a folder per model and `test_report.json`, their summary (`run_summary`)."""
    report_dir = os.path.join(workdir, RUN_REPORT_DIR)
    for name, report in reports.items():
        write_model_report(os.path.join(report_dir, name), report, official_test_ids)
    with open(os.path.join(report_dir, RUN_SUMMARY), "w") as f:
        json.dump(run_summary(reports), f, indent=2)


def format_summary(summary: dict[str, dict]) -> str:
    """The ranking figures of every model of a run's summary (`run_summary`), one model a line, with its mean
    probability and median odds ratio (`metrics.calibration`) where it has them; the header ends with the test set's
    positive rate, which a calibrated model's mean probability equals."""
    width = max(len(name) for name in summary)
    rate = next(figures["calibration"]["positive-rate"] for figures in summary.values() if "calibration" in figures)
    lines = [f"{'test set':<{width}}  PR-AUC-macro  ROC-AUC-macro  mean p  odds ratio  (positive rate {rate:.4f})"]
    for name, figures in summary.items():
        line = f"{name:<{width}}  {figures['PR-AUC-macro']:>12.4f}  {figures['ROC-AUC-macro']:>13.4f}"
        if "calibration" in figures:
            calibration = figures["calibration"]
            line += f"  {calibration['mean-probability']:>6.4f}  {calibration['median-odds-ratio']:>10.2f}"
        lines.append(line)
    return "\n".join(lines)


def format_table(figures: dict[str, float]) -> str:
    """One `name  value` line per figure, names padded so that the values line up."""
    width = max(len(name) for name in figures)
    return "\n".join(f"{name:<{width}}  {value:.6f}" for name, value in figures.items())


def _write_per_tag(path: Path, report: ModelReport) -> None:
    truth, scores = report.test.labels, report.test.probabilities
    pr_auc = metrics.per_tag_pr_auc(truth, scores)
    precision, recall, f1, _ = sk_metrics.precision_recall_fscore_support(
        truth, report.decisions, average=None, zero_division=0.0
    )
    lines = ["tag\tpositives\tPR-AUC\tROC-AUC\tthreshold\tprecision\trecall\tF-score"]
    for index, tag in enumerate(report.tags):
        both = 0 < truth[:, index].sum() < len(truth)
        roc = sk_metrics.roc_auc_score(truth[:, index], scores[:, index]) if both else float("nan")
        lines.append(
            f"{tag}\t{int(truth[:, index].sum())}\t{pr_auc[index]:.6f}\t{roc:.6f}\t{report.thresholds[index]:.6g}"
            f"\t{precision[index]:.6f}\t{recall[index]:.6f}\t{f1[index]:.6f}"
        )
    path.write_text("\n".join(lines) + "\n")


def agg_pyplot() -> ModuleType:
    """matplotlib's pyplot drawing to files only (imported when a plot is made: it is slow to import); the other
    libraries' plots use it too."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def _plot_precision_recall(path: Path, report: ModelReport) -> None:
    """Every tag's precision-recall curve (thin) and the micro-averaged one (thick)."""
    pyplot = agg_pyplot()
    truth, scores, figures = report.test.labels, report.test.probabilities, report.figures
    figure, axes = pyplot.subplots(figsize=(6, 5))
    for index in range(len(report.tags)):
        if truth[:, index].any():
            precision, recall, _ = sk_metrics.precision_recall_curve(truth[:, index], scores[:, index])
            axes.plot(recall, precision, color="#8db3d9", linewidth=0.6, alpha=0.6)
    precision, recall, _ = sk_metrics.precision_recall_curve(truth.ravel(), scores.ravel())
    axes.plot(
        recall, precision, color="black", linewidth=2, label=f"micro average (PR-AUC {figures['PR-AUC-micro']:.4f})"
    )
    axes.plot([], [], color="#8db3d9", label=f"each tag (macro PR-AUC {figures['PR-AUC-macro']:.4f})")
    axes.axhline(truth.mean(), color="grey", linestyle=":", label=f"positive rate {truth.mean():.4f}")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=f"Test set, {report.name}")
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def plot_per_tag_pr_auc(
    groundtruth: np.ndarray, predictions: np.ndarray, tags: Sequence[str], path: str | Path
) -> None:
    """Horizontal bars of each tag's PR-AUC, best first, each with the tag's positive rate marked.

    The positive rate is the PR-AUC of a constant predictor, so a bar that barely passes its mark shows a tag
    the model hardly ranks better than chance.
    """
    pyplot = agg_pyplot()
    pr_auc = metrics.per_tag_pr_auc(groundtruth, predictions)
    positive_rate = np.asarray(groundtruth, dtype=bool).mean(axis=0)
    order = np.argsort(-np.nan_to_num(pr_auc, nan=-1.0), kind="stable")
    positions = np.arange(len(order))
    labels = [metadata.short_tag_name(tags[index]) for index in order]

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
