"""The official MediaEval 2019 Emotion and Theme metrics, and per-tag decision thresholds.

The organisers computed every figure with scikit-learn (`average_precision_score`, `roc_auc_score`,
`precision_recall_fscore_support`, each with `average='macro'` and `'micro'`); this module calls the same
functions, so it reproduces the published results tables to 6 decimals. Rows are tracks, columns are tags.
"""

import warnings

import numpy as np
from numpy.typing import ArrayLike
from sklearn import metrics as sk_metrics

# The official names, in the column order of the published results tables.
OFFICIAL_METRIC_NAMES: tuple[str, ...] = (
    "PR-AUC-macro",
    "ROC-AUC-macro",
    "F-score-macro",
    "precision-macro",
    "recall-macro",
    "PR-AUC-micro",
    "ROC-AUC-micro",
    "F-score-micro",
    "precision-micro",
    "recall-micro",
)
# The ranking figures, which need only the scores (no decisions).
AUC_METRIC_NAMES: tuple[str, ...] = tuple(name for name in OFFICIAL_METRIC_NAMES if "AUC" in name)

# The organisers left scikit-learn's `zero_division` at its default, which counts 0/0 as 0 (with a
# warning); passing 0 gives the same numbers without the warnings.
_ZERO_DIVISION = 0.0


def as_label_matrix(values: ArrayLike, name: str) -> np.ndarray:
    """A 2-D bool matrix from bool or 0/1 values; `name` says which input was wrong."""
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (tracks, tags) matrix, got shape {array.shape}")
    if array.dtype != bool:
        not_binary = (array != 0) & (array != 1)
        if np.any(not_binary):
            row, tag = np.argwhere(not_binary)[0]
            raise ValueError(
                f"{name} must hold bool or 0/1 values, found {array[row, tag].item()!r} at row {row}, tag {tag}"
            )
    return array.astype(bool)


def as_score_matrix(values: ArrayLike, name: str) -> np.ndarray:
    """A 2-D float64 matrix (exact for float32 scores) without NaN or inf; `name` says which input was wrong."""
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (tracks, tags) matrix, got shape {array.shape}")
    if array.dtype.kind not in "biuf":  # bool, integer or float
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    not_finite = ~np.isfinite(array)
    if np.any(not_finite):
        row, tag = np.argwhere(not_finite)[0]
        raise ValueError(
            f"{name} contain {int(not_finite.sum())} NaN or infinite values (first at row {row}, tag {tag})"
        )
    return array.astype(np.float64)


def _check_same_shape(groundtruth: np.ndarray, other: np.ndarray, name: str) -> None:
    if other.shape != groundtruth.shape:
        raise ValueError(f"{name} shape {other.shape} does not match groundtruth shape {groundtruth.shape}")


def _tags_with_both_classes(groundtruth: np.ndarray) -> np.ndarray:
    """Indices of the tags whose macro figures are defined: at least one positive and one negative.

    A tag whose ground truth is constant has no ROC-AUC (and no PR-AUC or recall when it has no
    positives). Such tags are left out of every macro average, with one warning that names them, so that a
    small validation set still gets figures; micro figures pool all tags. The official test set has none.
    """
    positives = groundtruth.sum(axis=0)
    defined = (positives > 0) & (positives < groundtruth.shape[0])
    if not np.any(defined):
        raise ValueError("groundtruth has no tag with both positive and negative tracks: nothing to evaluate")
    if not np.all(defined):
        left_out = np.flatnonzero(~defined).tolist()
        warnings.warn(
            f"tags {left_out} have only positive or only negative tracks in groundtruth; "
            "they are left out of the macro averages",
            stacklevel=3,
        )
    return np.flatnonzero(defined)


def mediaeval_metrics(
    groundtruth: ArrayLike, predictions: ArrayLike, decisions: ArrayLike | None = None
) -> dict[str, float]:
    """The official MediaEval 2019 figures under their official names.

    groundtruth: bool (tracks, tags); predictions: scores (tracks, tags), e.g. probabilities; decisions:
    bool (tracks, tags). Without decisions only the four AUC figures are returned. The ranking metric of the
    task is `PR-AUC-macro` (average precision per tag, then the mean over tags).
    """
    truth = as_label_matrix(groundtruth, "groundtruth")
    scores = as_score_matrix(predictions, "predictions")
    _check_same_shape(truth, scores, "predictions")
    decided = None
    if decisions is not None:
        decided = as_label_matrix(decisions, "decisions")
        _check_same_shape(truth, decided, "decisions")

    tags = _tags_with_both_classes(truth)
    results = {
        "PR-AUC-macro": sk_metrics.average_precision_score(truth[:, tags], scores[:, tags], average="macro"),
        "ROC-AUC-macro": sk_metrics.roc_auc_score(truth[:, tags], scores[:, tags], average="macro"),
        "PR-AUC-micro": sk_metrics.average_precision_score(truth, scores, average="micro"),
        "ROC-AUC-micro": sk_metrics.roc_auc_score(truth, scores, average="micro"),
    }
    if decided is not None:
        for average, (truth_part, decided_part) in {
            "macro": (truth[:, tags], decided[:, tags]),
            "micro": (truth, decided),
        }.items():
            precision, recall, f_score, _ = sk_metrics.precision_recall_fscore_support(
                truth_part, decided_part, average=average, zero_division=_ZERO_DIVISION
            )
            results |= {
                f"F-score-{average}": f_score,
                f"precision-{average}": precision,
                f"recall-{average}": recall,
            }
    return {name: float(results[name]) for name in OFFICIAL_METRIC_NAMES if name in results}


def per_tag_pr_auc(groundtruth: ArrayLike, predictions: ArrayLike) -> np.ndarray:
    """Average precision of each tag (NaN where a tag has no positive track), e.g. to plot or rank tags."""
    truth = as_label_matrix(groundtruth, "groundtruth")
    scores = as_score_matrix(predictions, "predictions")
    _check_same_shape(truth, scores, "predictions")
    result = np.full(truth.shape[1], np.nan)
    has_positives = truth.any(axis=0)
    if np.any(has_positives):
        result[has_positives] = sk_metrics.average_precision_score(
            truth[:, has_positives], scores[:, has_positives], average=None
        )
    return result


def _best_f1_threshold(truth: np.ndarray, scores: np.ndarray) -> float:
    """For one tag: a threshold t such that `scores > t` is the F1-maximising decision on this set.

    The threshold lies halfway between the lowest score that is still decided positive and the next lower
    distinct score (-inf when every track is positive), so that strict `>` keeps exactly the best set.
    """
    precision, recall, thresholds = sk_metrics.precision_recall_curve(truth, scores)
    # The curve's last point (recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    if best == 0:
        return -np.inf
    lower, upper = float(thresholds[best - 1]), float(thresholds[best])
    midpoint = lower + (upper - lower) / 2
    return midpoint if midpoint < upper else lower


def best_f1_thresholds(groundtruth: ArrayLike, predictions: ArrayLike) -> np.ndarray:
    """Per tag, the threshold that maximises F1 on a labelled set (e.g. validation), for `decide`'s strict `>`.

    The organisers chose the baseline's thresholds as the best-F1 score itself and then applied `>`, which
    drops the track at that score; here the threshold sits below it, so `decide` gives the best set itself.
    A tag without positive tracks gets +inf (never decided positive), with one warning naming such tags.
    """
    truth = as_label_matrix(groundtruth, "groundtruth")
    scores = as_score_matrix(predictions, "predictions")
    _check_same_shape(truth, scores, "predictions")
    has_positives = truth.any(axis=0)
    if not np.all(has_positives):
        warnings.warn(
            f"tags {np.flatnonzero(~has_positives).tolist()} have no positive track; "
            "their threshold is +inf (never positive)",
            stacklevel=2,
        )
    return np.array(
        [
            _best_f1_threshold(truth[:, tag], scores[:, tag]) if has_positives[tag] else np.inf
            for tag in range(truth.shape[1])
        ]
    )


def decide(predictions: ArrayLike, thresholds: ArrayLike) -> np.ndarray:
    """Bool decisions `predictions > thresholds` per tag (strict, as the organisers applied them)."""
    scores = as_score_matrix(predictions, "predictions")
    limits = np.asarray(thresholds, dtype=np.float64)
    if limits.shape != (scores.shape[1],):
        raise ValueError(
            f"thresholds shape {limits.shape} does not match the {scores.shape[1]} tags of predictions "
            f"shape {scores.shape}"
        )
    if np.any(np.isnan(limits)):
        raise ValueError(f"thresholds contain NaN at tags {np.flatnonzero(np.isnan(limits)).tolist()}")
    return scores > limits
