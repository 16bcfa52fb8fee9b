"""The predictors a model must beat: the organisers' "popular" baseline and a constant predictor.

Both come without training, so the test report and the paper's table can set every model beside them.
"""

import numpy as np

from emorf_jax import metrics


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


def constant_predictor_figures(labels: np.ndarray) -> dict[str, float]:
    """The four AUC figures of a predictor that scores every track and tag 0.5, through `metrics.mediaeval_metrics`,
    so that its macro figures average exactly the tags that the models' do (those with both classes).

    A constant score ranks nothing: each tag's average precision is its positive rate in `labels`, whatever the
    constant, and its ROC-AUC 0.5. One constant for every tag (rather than each tag's training rate) also leaves the
    micro figures at chance (PR-AUC the positive rate of the whole matrix, ROC-AUC 0.5): ranking tags by their
    frequency is the popularity baseline's row, not this one's.
    """
    return metrics.mediaeval_metrics(labels, np.full(np.shape(labels), 0.5))
