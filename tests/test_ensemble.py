"""`python -m emorf_jax.ensemble`: any checkpoints or saved reports -> a MediaEval submission, or a refusal."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep import build, metadata
from data_prep.reader import load_prepared
from emorf_jax import ensemble, evaluate, metrics

from .conftest import CHUNK_FRAMES


def _run(tmp_path: Path, name: str, *arguments: str) -> Path:
    output = tmp_path / name
    assert ensemble.main([*arguments, f"--output_dir={output}"]) == 0
    return output


def test_two_checkpoints_average_and_thresholds_come_from_validation(prepared_data_dir, random_checkpoints, tmp_path):
    data_dir, _ = prepared_data_dir
    alone = [
        _run(tmp_path, f"alone{n}", f"--checkpoint={c}", f"--data_dir={data_dir}")
        for n, c in enumerate(random_checkpoints)
    ]
    both = _run(tmp_path, "both", *(f"--checkpoint={c}" for c in random_checkpoints), f"--data_dir={data_dir}")
    for name in ("predictions.npy", "validation_predictions.npy"):
        mean = np.mean([np.load(folder / name) for folder in alone], axis=0)
        np.testing.assert_allclose(np.load(both / name), mean, rtol=1e-6)
    prepared = load_prepared(data_dir)
    predictions, decisions = np.load(both / "predictions.npy"), np.load(both / "decisions.npy")
    assert predictions.dtype == np.float32 and decisions.dtype == bool
    assert predictions.shape == (len(prepared.tsv_track_ids["test"]), len(prepared.tags))
    assert (both / "track_ids.txt").read_text().split() == list(prepared.tsv_track_ids["test"])
    tags, thresholds = evaluate.read_thresholds(both / "thresholds.tsv")
    assert tags == list(prepared.tags)
    expected = metrics.best_f1_thresholds(
        prepared.parts["validation"].labels, np.load(both / "validation_predictions.npy")
    )
    np.testing.assert_array_equal(thresholds, expected)
    np.testing.assert_array_equal(decisions, predictions > thresholds)  # strict
    figures = json.loads((both / "metrics.json").read_text())
    assert set(figures) == set(metrics.OFFICIAL_METRIC_NAMES)
    assert (both / "precision_recall.png").stat().st_size > 10_000
    assert len((both / "per_tag.tsv").read_text().splitlines()) == len(prepared.tags) + 1


def test_saved_report_predictions_stand_in_for_a_checkpoint(prepared_data_dir, random_checkpoints, tmp_path):
    data_dir, _ = prepared_data_dir
    first = _run(tmp_path, "first", f"--checkpoint={random_checkpoints[0]}", f"--data_dir={data_dir}")
    report = tmp_path / "run" / "report"
    (report / "model").mkdir(parents=True)
    shutil.copy(first / "track_ids.txt", report / "test_track_ids.txt")
    shutil.copy(first / "validation_track_ids.txt", report / "validation_track_ids.txt")
    shutil.copy(first / "predictions.npy", report / "model" / "test_predictions.npy")
    shutil.copy(first / "validation_predictions.npy", report / "model" / "validation_predictions.npy")
    mixed = _run(
        tmp_path,
        "mixed",
        f"--checkpoint={random_checkpoints[1]}",
        f"--predictions={report / 'model'}",
        f"--data_dir={data_dir}",
    )
    both = _run(tmp_path, "both", *(f"--checkpoint={c}" for c in random_checkpoints), f"--data_dir={data_dir}")
    np.testing.assert_allclose(np.load(mixed / "predictions.npy"), np.load(both / "predictions.npy"), rtol=1e-6)


def test_a_submission_without_every_official_test_track_is_refused(
    synthetic_tree, random_checkpoints, tmp_path, capsys
):
    lost = metadata.read_split(synthetic_tree / "data", 0, "test")[2]
    audio = tmp_path / "audio"
    shutil.copytree(synthetic_tree / "audio", audio)
    (audio / lost.path).unlink()
    build.build_dataset(
        audio, synthetic_tree / "data", tmp_path / "data", workers=2, progress=False, chunk_frames=CHUNK_FRAMES
    )
    output = tmp_path / "out"
    status = ensemble.main(
        [f"--checkpoint={random_checkpoints[0]}", f"--data_dir={tmp_path / 'data'}", f"--output_dir={output}"]
    )
    assert status == 2
    assert f"1 official test tracks are missing ({lost.track_id})" in capsys.readouterr().err
    assert not (output / "predictions.npy").exists()


def test_members_with_other_rows_are_refused(tmp_path):
    ids = ["track_0000001", "track_0000002", "track_0000003"]
    member = {split: (np.full((3, 2), 0.5), ids) for split in ensemble.SPLITS}
    reordered = {**member, "test": (np.full((3, 2), 0.5), ids[::-1])}
    labels = {split: np.eye(3, 2, dtype=bool) for split in ensemble.SPLITS}
    with pytest.raises(ValueError, match="member 2 has other test rows than member 1"):
        ensemble.write_ensemble(str(tmp_path / "out"), ["a", "b"], [member, reordered], labels, ids)
    assert not (tmp_path / "out").exists()
