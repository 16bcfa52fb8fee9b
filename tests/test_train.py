"""The main job end to end on real shards: `python -m emorf_jax.main` in subprocesses, killed and resumed for real."""

import json
from pathlib import Path
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import faresnet
from data_prep.builder import load_prepared
from emorf_jax import checkpoints, inference, input_pipeline, train

REPO = Path(__file__).resolve().parents[1]


def _command(data_dir: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "emorf_jax.main", "--config=configs/faresnet.py:test",
            f"--config.dataset.data_dir={data_dir}", f"--workdir={workdir}"]


def _test_config(data_dir: Path):
    config = faresnet.get_config("test")
    config.dataset.data_dir = str(data_dir)
    return config


def _run(data_dir: Path, workdir: Path) -> str:
    result = subprocess.run(_command(data_dir, workdir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _latest_params(workdir: Path):
    with checkpoints.open_manager(str(workdir), checkpoints.LATEST, read_only=True) as manager:
        weights, meta = checkpoints.restore(manager)
    return manager.latest_step(), weights["params"], weights["average_params"]


@pytest.fixture(scope="module")
def reference_run(prepared_data_dir, tmp_path_factory):
    data_dir, _ = prepared_data_dir
    workdir = tmp_path_factory.mktemp("reference_run")
    return data_dir, workdir, _run(data_dir, workdir)


def test_run_prints_the_test_report(reference_run):
    _, workdir, stdout = reference_run
    report = json.loads((workdir / "report" / "test_report.json").read_text())
    assert {"final", "selected", "swa", "snapshot_ensemble_2", "constant_predictor"} <= set(report)
    assert set(report["final"]) >= {"PR-AUC-macro", "ROC-AUC-macro", "F-score-macro", "recall-micro"}
    assert "snapshot_ensemble_2" in stdout and "constant_predictor" in stdout
    assert (workdir / "report" / "final_predictions.npy").exists()


def test_snapshots_are_where_the_config_puts_them(reference_run):
    data_dir, workdir, _ = reference_run
    config = _test_config(data_dir)
    prepared = load_prepared(data_dir, "hop512")
    steps_per_epoch = input_pipeline.steps_per_epoch(prepared, config.batch_size)
    total = config.num_epochs * steps_per_epoch
    expected = train.snapshot_steps(config, steps_per_epoch, total)
    assert len(expected) >= 2
    assert sorted(int(p.name) for p in (workdir / "snapshots").iterdir() if p.name.isdigit()) == expected


def test_a_checkpoint_loads_without_the_config_and_predicts_as_in_training(reference_run):
    data_dir, workdir, _ = reference_run
    tagger = inference.load_tagger(str(workdir / checkpoints.LATEST))
    prepared = load_prepared(data_dir, "hop512")
    assert tagger.tags == list(prepared.tags)
    assert tagger.meta["model"]["frequency_aware"] is True
    final_predictions = np.load(workdir / "report" / "final_predictions.npy")
    window = _test_config(data_dir).input.eval_window_frames
    test_ids = prepared.track_ids["test"]
    checked = 0
    for example in prepared.builder.as_dataset(split="test").as_numpy_iterator():
        if example["num_chunks"] != 1:
            continue
        probabilities = tagger.tag_spectrogram(example["spectrogram"], window_frames=window)
        row = test_ids.index(example["track_id"].decode())
        np.testing.assert_allclose(probabilities, final_predictions[row], rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked >= 3


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(reference_run, tmp_path):
    data_dir, reference_workdir, _ = reference_run
    workdir = tmp_path / "interrupted"
    process = subprocess.Popen(_command(data_dir, workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (workdir / checkpoints.LATEST).is_dir() or not any(
            p.name.isdigit() for p in (workdir / checkpoints.LATEST).iterdir()):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at, _, _ = _latest_params(workdir)
    reference_step, reference_params, reference_average = _latest_params(reference_workdir)
    assert killed_at < reference_step, "the kill must interrupt the run before its end"

    _run(data_dir, workdir)
    step, params, average = _latest_params(workdir)
    assert step == reference_step
    for got, want in ((params, reference_params), (average, reference_average)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_clear_errors_before_any_compute(prepared_data_dir, tmp_path):
    data_dir, _ = prepared_data_dir
    missing = _test_config(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match="python -m data_prep.build"):
        train.train_and_evaluate(missing, str(tmp_path / "w1"))

    odd_batch = _test_config(data_dir)
    odd_batch.batch_size = 3
    with pytest.raises(ValueError, match="not divisible by the 2 devices"):
        train.train_and_evaluate(odd_batch, str(tmp_path / "w2"))

    wrong_tags = _test_config(data_dir)
    wrong_tags.num_classes = 56
    with pytest.raises(ValueError, match="has 9 tags"):
        train.train_and_evaluate(wrong_tags, str(tmp_path / "w3"))

    first, second = _test_config(data_dir), _test_config(data_dir)
    second.model.rho = 4
    checkpoints.check_workdir_config(str(tmp_path / "w4"), first)
    with pytest.raises(ValueError, match=r"another config \(differences: model.rho\)"):
        train.train_and_evaluate(second, str(tmp_path / "w4"))


def test_a_short_run_on_synthetic_shards_beats_the_positive_rate(tmp_path_factory):
    """In process: a larger synthetic set than the shared fixture, a small FA-ResNet, about a minute of CPU."""
    from data_prep import build, synthetic

    root = tmp_path_factory.mktemp("learnable")
    synthetic.make_synthetic(root, num_tracks=100, seed=1, duration=4.0, long_tracks=0, duplicate_groups=0)
    build.build_dataset(root / "audio", root / "data", root / "prepared", "hop512", split_index=0, workers=2,
                        progress=False)
    config = _test_config(root / "prepared")
    config.model.base_channels = 8
    config.model.rho = 3
    config.input.crop_frames = 128
    config.input.eval_window_frames = 344
    config.batch_size = 8
    config.learning_rate = 3e-3
    config.num_epochs = 12
    config.lr_constant_epochs = 8
    config.lr_decay_end_epoch = 12
    config.eval_every_epochs = 12
    config.checkpoint_every_steps = 1000
    report = train.train_and_evaluate(config, str(tmp_path_factory.mktemp("learnable_run")))
    positive_rate = report["constant_predictor"]["PR-AUC-macro"]
    assert report["final"]["PR-AUC-macro"] > positive_rate + 0.15, report
    assert report["final"]["ROC-AUC-macro"] > 0.6, report  # chance is 0.5; the test split has ~25 tracks
