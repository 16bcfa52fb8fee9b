"""The predictors a model must beat: the organisers' "popular" baseline and a constant predictor.

Both come without training, so the test report and the paper's table can set every model beside them.
"""

import numpy as np


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
    """The ranking figures of a predictor that gives every track the same scores: no ranking at all (ROC-AUC 0.5),
    and a macro PR-AUC of the mean positive rate."""
    return {"PR-AUC-macro": float(np.asarray(labels).mean()), "ROC-AUC-macro": 0.5}
