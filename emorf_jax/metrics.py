"""The official MediaEval 2019 Emotion and Theme metrics, and per-tag decision thresholds.

The organisers computed every figure with scikit-learn (`average_precision_score`, `roc_auc_score`,
`precision_recall_fscore_support`, each with `average='macro'` and `'micro'`); this module calls the same
functions, so it reproduces the published results tables to 6 decimals. Rows are tracks, columns are tags.
"""

import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn import metrics as sk_metrics
from sklearn.linear_model import LogisticRegression

from data_prep.metadata import short_tag_name

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

# Probabilities are clipped to [eps, 1 - eps] before the logit of the calibration fit, so that a float32 score of
# exactly 0 or 1 gives a finite logit (+-13.8).
CALIBRATION_EPS = 1e-6
# The calibration fit's Newton solver stops when its steps are below this tolerance, after at most so many steps.
_FIT_TOLERANCE = 1e-10
_FIT_ITERATIONS = 100


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


def _listed(tags: np.ndarray, tag_names: Sequence[str] | None) -> str:
    """The tags a warning is about: their short names when the caller gave the names, else their column numbers."""
    if tag_names is None:
        return str(tags.tolist())
    return ", ".join(short_tag_name(tag_names[tag]) for tag in tags)


def _tags_with_both_classes(groundtruth: np.ndarray, tag_names: Sequence[str] | None = None) -> np.ndarray:
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
        warnings.warn(
            f"tags {_listed(np.flatnonzero(~defined), tag_names)} have only positive or only negative tracks in "
            "groundtruth; "
            "they are left out of the macro averages",
            stacklevel=3,
        )
    return np.flatnonzero(defined)


def mediaeval_metrics(
    groundtruth: ArrayLike,
    predictions: ArrayLike,
    decisions: ArrayLike | None = None,
    tag_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """The official MediaEval 2019 figures under their official names.

    groundtruth: bool (tracks, tags); predictions: scores (tracks, tags), e.g. probabilities; decisions:
    bool (tracks, tags). Without decisions only the four AUC figures are returned. The ranking metric of the
    task is `PR-AUC-macro` (average precision per tag, then the mean over tags). `tag_names` (the columns' tags)
    name the tags a warning is about; without them, their column numbers.
    """
    truth = as_label_matrix(groundtruth, "groundtruth")
    scores = as_score_matrix(predictions, "predictions")
    _check_same_shape(truth, scores, "predictions")
    decided = None
    if decisions is not None:
        decided = as_label_matrix(decisions, "decisions")
        _check_same_shape(truth, decided, "decisions")

    tags = _tags_with_both_classes(truth, tag_names)
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


def best_f1_thresholds(
    groundtruth: ArrayLike, predictions: ArrayLike, tag_names: Sequence[str] | None = None
) -> np.ndarray:
    """Per tag, the threshold that maximises F1 on a labelled set (e.g. validation), for `decide`'s strict `>`.

    The organisers chose the baseline's thresholds as the best-F1 score itself and then applied `>`, which
    drops the track at that score; here the threshold sits below it, so `decide` gives the best set itself.
    A tag without positive tracks gets +inf (never decided positive), with one warning naming such tags
    (`tag_names`, else their column numbers).
    """
    truth = as_label_matrix(groundtruth, "groundtruth")
    scores = as_score_matrix(predictions, "predictions")
    _check_same_shape(truth, scores, "predictions")
    has_positives = truth.any(axis=0)
    if not np.all(has_positives):
        warnings.warn(
            f"tags {_listed(np.flatnonzero(~has_positives), tag_names)} have no positive track; "
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


def _odds(probability: np.ndarray) -> np.ndarray:
    """p / (1 - p), +inf (without a warning) where p is 1."""
    with np.errstate(divide="ignore"):
        return probability / (1 - probability)


def _logistic_fit(y: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(a, b) of the maximum-likelihood fit P(y = 1) = sigmoid(a + b * logits), unpenalised; (NaN, NaN) where the
    logits have no spread or separate the classes (every positive's logit at or above every negative's, or at or
    below: the likelihood then grows without bound)."""
    positives, negatives = logits[y == 1], logits[y == 0]
    if positives.min() >= negatives.max() or positives.max() <= negatives.min():
        return np.nan, np.nan
    fit = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=_FIT_TOLERANCE, max_iter=_FIT_ITERATIONS)
    fit.fit(logits[:, None], y)
    return float(fit.intercept_[0]), float(fit.coef_[0, 0])


def calibration(
    groundtruth: ArrayLike, predictions: ArrayLike, tag_names: Sequence[str] | None = None
) -> dict[str, float]:
    """How far the probabilities are from the frequencies they predict, which no ranking figure shows.

    With y the 0/1 ground truth and p the probabilities, both (tracks, tags):

    - `mean-probability`: the mean of p over all entries; `positive-rate`: the mean of y. A calibrated model's
      mean probability is the positive rate.
    - `median-odds-ratio`: over the tags with both classes (those of the macro figures), the median of
      odds(mean of p over the tag's tracks) / odds(the tag's positive rate), odds(x) = x / (1 - x): how many times
      too likely a typical tag is said to be (1 when calibrated). A loss that weights positives w times (BCE with
      `pos_weight` w) multiplies the odds its model learns by about w.
    - `calibration-intercept` a and `calibration-slope` b: the logistic fit P(y = 1) = sigmoid(a + b * logit(p))
      over all entries (maximum likelihood), logit(p) = log(p / (1 - p)) with p clipped to
      [CALIBRATION_EPS, 1 - CALIBRATION_EPS]. A calibrated model has a = 0 and b = 1; odds w times too high give
      a = -log(w), b = 1; b < 1 means too confident. NaN where every p is the same (no spread to fit) or the logits
      separate the classes perfectly (no finite fit).
    """
    truth = as_label_matrix(groundtruth, "groundtruth")
    scores = as_score_matrix(predictions, "predictions")
    _check_same_shape(truth, scores, "predictions")
    if scores.min() < 0 or scores.max() > 1:
        raise ValueError(
            f"predictions have values in [{scores.min():.4g}, {scores.max():.4g}], outside the probabilities' "
            "[0, 1] (logits? apply a sigmoid first)"
        )
    tags = _tags_with_both_classes(truth, tag_names)
    odds_ratio = _odds(scores[:, tags].mean(axis=0)) / _odds(truth[:, tags].mean(axis=0))
    clipped = np.clip(scores, CALIBRATION_EPS, 1 - CALIBRATION_EPS).ravel()
    y = truth.ravel().astype(np.float64)
    intercept, slope = _logistic_fit(y, np.log(clipped / (1 - clipped)))
    return {
        "mean-probability": float(scores.mean()),
        "positive-rate": float(y.mean()),
        "median-odds-ratio": float(np.median(odds_ratio)),
        "calibration-intercept": intercept,
        "calibration-slope": slope,
    }
