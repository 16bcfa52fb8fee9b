"""Ensembles: several models' predictions averaged into one model's report (the authors' snapshot and multi-model
ensembles).

A member is any model's {split: Predictions} over the validation and test tracks of one prepared dataset: a
checkpoint run over that dataset, or the saved predictions of a report's model folder (`report.py`). The average is
reported as one model (`report.write_model_report`); an ensemble is written only as a MediaEval submission, so a set
of test rows that is not exactly the official test tracks is refused before any model runs (`collect_members`).
"""

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from data_prep.reader import PreparedDataset, load_prepared
from emorf_jax import checkpoints, report, split_predictions, submission
from emorf_jax.metrics import as_score_matrix
from emorf_jax.models import registry

MemberPredictions = Mapping[str, split_predictions.Predictions]  # {split: predictions} of one model


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


def average_members(members: Sequence[MemberPredictions]) -> dict[str, split_predictions.Predictions]:
    """Each split's probabilities averaged over the members, which must have predicted the same rows."""
    averaged = {}
    for split in report.SPLITS:
        first = members[0][split]
        for number, member in enumerate(members[1:], start=2):
            if tuple(member[split].track_ids) != tuple(first.track_ids):
                raise ValueError(f"member {number} has other {split} rows than member 1: they cannot be averaged")
        probabilities = average_predictions([member[split].probabilities for member in members])
        averaged[split] = dataclasses.replace(first, probabilities=probabilities)
    return averaged


def checkpoint_members(
    paths: Sequence[str], data_dir: str, batch_size: int = 8
) -> tuple[list[MemberPredictions], PreparedDataset]:
    """Each checkpoint's predictions over the prepared dataset in `data_dir` its meta names (features, split), and
    that dataset; checkpoints whose outputs cannot be averaged (`checkpoints.check_compatible`) are refused."""
    loaded, prepared = _load_checkpoints(paths, data_dir)
    return _predict(loaded, prepared, batch_size), prepared


def _load_checkpoints(paths: Sequence[str], data_dir: str) -> tuple[list[tuple[dict, dict]], PreparedDataset]:
    """The (variables, meta) of each checkpoint, checked compatible, and the prepared dataset their meta names."""
    loaded = [(path, *checkpoints.load_checkpoint(path)) for path in paths]
    checkpoints.check_compatible([(path, meta) for path, _, meta in loaded])
    dataset = loaded[0][2]["dataset"]
    prepared = load_prepared(data_dir, dataset["config_name"], dataset["split_index"])
    return [(variables, meta) for _, variables, meta in loaded], prepared


def _predict(
    loaded: Sequence[tuple[dict, dict]], prepared: PreparedDataset, batch_size: int
) -> list[MemberPredictions]:
    """Each loaded checkpoint run over the validation and test tracks of `prepared`."""
    members = []
    for variables, meta in loaded:
        predictor = split_predictions.Predictor(
            registry.build(meta["model"]), prepared, window_frames=meta["window_frames"], batch_size=batch_size
        )
        members.append({split: predictor.predict(variables, split) for split in report.SPLITS})
    return members


def check_submission_rows(prepared: PreparedDataset) -> None:
    """Refuses (ValueError) a prepared dataset whose stored test tracks are not the official ones, which no
    ensemble of it can submit; for tracks that data preparation could not store, the error names its failures
    report, where their reasons are."""
    try:
        submission.check_rows(prepared.parts["test"].track_ids, prepared.tsv_track_ids["test"])
    except ValueError as error:
        failed = prepared.missing("test")
        if not failed:
            raise
        raise ValueError(
            f"{error}; {len(failed)} test tracks failed in data preparation, their reasons are in "
            f"{prepared.failures_report}: mend or replace those files and prepare the data again"
        ) from None


def report_folder_members(directories: Sequence[str], prepared: PreparedDataset) -> list[MemberPredictions]:
    """The saved predictions of report model folders, each refused unless its rows are the prepared dataset's (whose
    labels they are scored against)."""
    members = []
    for directory in directories:
        member = {}
        for split, (probabilities, track_ids) in report.read_model_predictions(directory).items():
            part = prepared.parts[split]
            if tuple(track_ids) != part.track_ids:
                raise ValueError(
                    f"{directory} has other {split} rows than the prepared dataset in {prepared.directory}: "
                    "were its predictions made on another dataset?"
                )
            member[split] = split_predictions.Predictions(probabilities, part.labels, part.track_ids)
        members.append(member)
    return members


def collect_members(
    data_dir: str,
    *,
    checkpoint_paths: Sequence[str] = (),
    report_folders: Sequence[str] = (),
    features: str = "hop512",
    split_index: int = 0,
    batch_size: int = 8,
) -> tuple[list[MemberPredictions], PreparedDataset]:
    """The members of checkpoints and report model folders, and the prepared dataset in `data_dir` they are scored
    on: the one the checkpoints' meta names, else the one of `features` and `split_index`. Every row is checked
    before any model runs: the dataset's test tracks must be the official ones (`check_submission_rows`) and
    each report folder's rows the dataset's."""
    if not checkpoint_paths and not report_folders:
        raise ValueError("an ensemble needs at least one checkpoint or report model folder")
    if checkpoint_paths:
        loaded, prepared = _load_checkpoints(checkpoint_paths, data_dir)
    else:
        loaded, prepared = [], load_prepared(data_dir, features, split_index)
    check_submission_rows(prepared)
    saved = report_folder_members(report_folders, prepared)
    return _predict(loaded, prepared, batch_size) + saved, prepared


def write_ensemble(
    output_dir: str, members: Sequence[MemberPredictions], prepared: PreparedDataset
) -> report.ModelReport:
    """Averages the members into one model's report folder in `output_dir`, with its MediaEval submission; a test set
    that is not exactly the official test tracks is refused (ValueError) before anything is written."""
    averaged = average_members(members)
    official = prepared.tsv_track_ids["test"]
    submission.check_rows(averaged["test"].track_ids, official)
    ensemble = report.model_report("ensemble", prepared.tags, averaged["validation"], averaged["test"])
    report.write_model_report(output_dir, ensemble, official)
    return ensemble
