"""`python -m emorf_jax.ensemble`: any checkpoints or saved model reports -> one model's report and a MediaEval
submission, or a refusal."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep import metadata, preparation
from data_prep.reader import load_prepared
from emorf_jax import checkpoints, ensemble, metrics, report, split_predictions
from emorf_jax import thresholds as thresholds_io
from emorf_jax.ensemble import __main__ as ensemble_command

from .conftest import CHUNK_FRAMES


def _run(tmp_path: Path, name: str, *arguments: str) -> Path:
    output = tmp_path / name
    assert ensemble_command.main([*arguments, f"--output_dir={output}"]) == 0
    return output


def test_two_checkpoints_average_and_thresholds_come_from_validation(
    prepared_data_dir, random_checkpoints, tmp_path, capsys
):
    data_dir, _ = prepared_data_dir
    alone = [
        _run(tmp_path, f"alone{n}", f"--checkpoint={c}", f"--data_dir={data_dir}")
        for n, c in enumerate(random_checkpoints)
    ]
    capsys.readouterr()
    both = _run(tmp_path, "both", *(f"--checkpoint={c}" for c in random_checkpoints), f"--data_dir={data_dir}")
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines()[1:])
    for name in ("test_predictions.npy", "validation_predictions.npy"):
        mean = np.mean([np.load(folder / name) for folder in alone], axis=0)
        np.testing.assert_allclose(np.load(both / name), mean, rtol=1e-6)
    prepared = load_prepared(data_dir)
    predictions, decisions = np.load(both / "test_predictions.npy"), np.load(both / "test_decisions.npy")
    assert predictions.dtype == np.float32 and decisions.dtype == bool
    assert predictions.shape == (len(prepared.tsv_track_ids["test"]), len(prepared.tags))
    for split in report.SPLITS:
        assert (both / f"{split}_track_ids.txt").read_text().split() == list(prepared.tsv_track_ids[split])
    # The submission is the test report itself, its rows exactly the official ones.
    np.testing.assert_array_equal(np.load(both / "submission" / "predictions.npy"), predictions)
    np.testing.assert_array_equal(np.load(both / "submission" / "decisions.npy"), decisions)
    tags, thresholds = thresholds_io.read(both / "thresholds.tsv")
    assert tags == list(prepared.tags)
    expected = metrics.best_f1_thresholds(
        prepared.parts["validation"].labels, np.load(both / "validation_predictions.npy")
    )
    np.testing.assert_array_equal(thresholds, expected)
    np.testing.assert_array_equal(decisions, predictions > thresholds)  # strict
    figures = json.loads((both / "metrics.json").read_text())
    assert figures == metrics.mediaeval_metrics(prepared.parts["test"].labels, predictions, decisions)
    calibration = json.loads((both / "calibration.json").read_text())
    assert calibration == metrics.calibration(prepared.parts["test"].labels, predictions)
    assert calibration["positive-rate"] == pytest.approx(prepared.parts["test"].labels.mean())
    assert printed["median-odds-ratio"] == f"{calibration['median-odds-ratio']:.6f}"
    assert printed["PR-AUC-macro"] == f"{figures['PR-AUC-macro']:.6f}"
    assert (both / "precision_recall.png").stat().st_size > 10_000
    assert len((both / "per_tag.tsv").read_text().splitlines()) == len(prepared.tags) + 1


def test_a_saved_model_folder_stands_in_for_its_checkpoint(prepared_data_dir, random_checkpoints, tmp_path):
    data_dir, _ = prepared_data_dir
    first = _run(tmp_path, "first", f"--checkpoint={random_checkpoints[0]}", f"--data_dir={data_dir}")
    mixed = _run(
        tmp_path, "mixed", f"--checkpoint={random_checkpoints[1]}", f"--predictions={first}", f"--data_dir={data_dir}"
    )
    both = _run(tmp_path, "both", *(f"--checkpoint={c}" for c in random_checkpoints), f"--data_dir={data_dir}")
    for name in ("test_predictions.npy", "validation_predictions.npy"):
        np.testing.assert_allclose(np.load(mixed / name), np.load(both / name), rtol=1e-6)
    # Saved predictions alone need the dataset named: --features and --split.
    again = _run(tmp_path, "again", f"--predictions={first}", f"--data_dir={data_dir}", "--features=hop512")
    for name in ("test_predictions.npy", "test_decisions.npy", "thresholds.tsv", "metrics.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name


def test_a_submission_without_every_official_test_track_is_refused_before_any_model_runs(
    synthetic_tree, random_checkpoints, tmp_path, capsys, monkeypatch
):
    """A test track that data preparation could not store: the error names it and the prepared data's failures.tsv,
    and comes before any checkpoint is run over the dataset (`Predictor.predict` is watched, not replaced)."""
    lost = metadata.read_split(synthetic_tree / "data", 0, "test")[2]
    audio = tmp_path / "audio"
    shutil.copytree(synthetic_tree / "audio", audio)
    (audio / lost.path).unlink()
    preparation.build_dataset(
        preparation.BuildOptions(
            audio, synthetic_tree / "data", tmp_path / "data", workers=2, progress=False, chunk_frames=CHUNK_FRAMES
        )
    )
    predicted = []
    real_predict = split_predictions.Predictor.predict
    monkeypatch.setattr(
        split_predictions.Predictor, "predict", lambda self, *a, **k: predicted.append(a) or real_predict(self, *a, **k)
    )
    output = tmp_path / "out"
    status = ensemble_command.main(
        [f"--checkpoint={random_checkpoints[0]}", f"--data_dir={tmp_path / 'data'}", f"--output_dir={output}"]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert f"1 official test tracks are missing ({lost.track_id})" in error
    failures = load_prepared(tmp_path / "data").failures_report
    assert f"1 test tracks failed in data preparation, their reasons are in {failures}" in error
    assert error.count("\n") == 1 and predicted == []
    assert not output.exists()


def test_checkpoints_of_other_input_statistics_are_refused(random_checkpoints, prepared_data_dir, tmp_path, capsys):
    variables, meta = checkpoints.load_checkpoint(random_checkpoints[0])
    meta["normalisation"]["mean"] = [value + 1.0 for value in meta["normalisation"]["mean"]]
    with checkpoints.open_manager(str(tmp_path), checkpoints.SWA) as manager:
        checkpoints.save(manager, 10, variables, meta)
    other = tmp_path / checkpoints.SWA
    status = ensemble_command.main(
        [
            f"--checkpoint={random_checkpoints[0]}",
            f"--checkpoint={other}",
            f"--data_dir={prepared_data_dir[0]}",
            f"--output_dir={tmp_path / 'out'}",
        ]
    )
    assert status == 2
    assert f"{other} has other normalisation than {random_checkpoints[0]}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _member(validation_ids: tuple[str, ...], test_ids: tuple[str, ...]) -> dict[str, split_predictions.Predictions]:
    labels = np.eye(len(test_ids), 2, dtype=bool)
    return {
        "validation": split_predictions.Predictions(np.full(labels.shape, 0.5), labels, validation_ids),
        "test": split_predictions.Predictions(np.full(labels.shape, 0.5), labels, test_ids),
    }


def test_members_with_other_rows_are_refused(prepared_data_dir, tmp_path):
    ids = ("track_0000001", "track_0000002", "track_0000003")
    with pytest.raises(ValueError, match="member 2 has other test rows than member 1"):
        ensemble.average_members([_member(ids, ids), _member(ids, ids[::-1])])
    # A saved model folder is scored against the prepared dataset's labels: its rows must be that dataset's.
    prepared = load_prepared(prepared_data_dir[0])
    folder = tmp_path / "model"
    folder.mkdir()
    for split in report.SPLITS:
        rows = prepared.track_ids[split][::-1] if split == "validation" else prepared.track_ids[split]
        np.save(folder / f"{split}_predictions.npy", np.full((len(rows), len(prepared.tags)), 0.5, np.float32))
        (folder / f"{split}_track_ids.txt").write_text("".join(f"{track_id}\n" for track_id in rows))
    with pytest.raises(ValueError, match="other validation rows than the prepared dataset"):
        ensemble.report_folder_members([str(folder)], prepared)
