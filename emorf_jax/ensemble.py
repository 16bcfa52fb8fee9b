"""Averaging the predictions of several models or snapshots (the authors' snapshot and multi-model ensembles)."""

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from emorf_jax.metrics import as_score_matrix


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
                f"predictions[{index}] shape {matrix.shape} does not match predictions[0] shape "
                f"{matrices[0].shape}"
            )
        if matrix.min() < 0 or matrix.max() > 1:
            raise ValueError(
                f"predictions[{index}] has values in [{matrix.min():.4g}, {matrix.max():.4g}], outside the "
                "probabilities' [0, 1] (logits? apply a sigmoid first)"
            )
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (len(matrices),):
            raise ValueError(
                f"weights shape {weights.shape} does not match the {len(matrices)} prediction matrices"
            )
        if np.any(~np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights.tolist()}")
    return np.average(np.stack(matrices), axis=0, weights=weights)
