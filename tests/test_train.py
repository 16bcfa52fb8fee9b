"""The main job end to end on real shards: `python -m emorf_jax.main` in subprocesses, killed and resumed for real."""

import functools
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import librosa
import numpy as np
import pytest
from flax import jax_utils

from configs import faresnet
from data_prep import build, features, metadata
from data_prep.reader import load_prepared
from emorf_jax import (
    checkpoints,
    demo,
    ensemble,
    input_pipeline,
    metrics,
    run_folder,
    split_predictions,
    submission,
    thresholds,
    train,
    weight_averaging,
)
from emorf_jax.ensemble import __main__ as ensemble_command
from emorf_jax.tagger import load_tagger, model_card
from tests.process_output import stderr_excerpt

REPO = Path(__file__).resolve().parents[1]


def _command(data_dir: Path, workdir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "emorf_jax.main",
        "--config=configs/faresnet.py:test",
        f"--config.dataset.data_dir={data_dir}",
        f"--workdir={workdir}",
        *overrides,
    ]


def _test_config(data_dir: Path):
    config = faresnet.get_config("test")
    config.dataset.data_dir = str(data_dir)
    return config


def _run(data_dir: Path, workdir: Path, *overrides: str) -> str:
    result = subprocess.run(
        _command(data_dir, workdir, *overrides), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, stderr_excerpt(result.stderr)
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


def test_run_prints_the_test_report_and_saves_every_row(reference_run, synthetic_tree):
    data_dir, workdir, stdout = reference_run
    report = json.loads((workdir / "report" / "test_report.json").read_text())
    assert {"final", "selected", "swa", "snapshot_ensemble_2", "constant_predictor"} <= set(report)
    assert set(report["final"]) >= {"PR-AUC-macro", "ROC-AUC-macro", "F-score-macro", "recall-micro"}
    assert "snapshot_ensemble_2" in stdout and "constant_predictor" in stdout
    prepared = load_prepared(data_dir, "hop512")
    for model, split in itertools.product(set(report) - {"constant_predictor"}, ("validation", "test")):
        ids = (workdir / "report" / model / f"{split}_track_ids.txt").read_text().split()
        assert ids == list(prepared.track_ids[split]) == list(prepared.tsv_track_ids[split])
        predictions = np.load(workdir / "report" / model / f"{split}_predictions.npy")
        assert predictions.shape == (len(ids), 9) and predictions.dtype == np.float32
    swa_calibration = report["swa"].pop("calibration")
    assert json.loads((workdir / "report" / "swa" / "metrics.json").read_text()) == report["swa"]
    assert json.loads((workdir / "report" / "swa" / "calibration.json").read_text()) == swa_calibration
    assert swa_calibration["mean-probability"] > 0 and 0 < swa_calibration["positive-rate"] < 1
    # Every test track is in the shards, so each model's test rows are also written as a MediaEval submission.
    submitted = np.load(workdir / "report" / "selected" / "submission" / "predictions.npy")
    np.testing.assert_array_equal(submitted, np.load(workdir / "report" / "selected" / "test_predictions.npy"))
    # The report ends with the command that tags music with the run's SWA model; it runs as printed.
    assert stdout.splitlines()[-2] == "Tag music with the model just trained:"
    command = shlex.split(stdout.splitlines()[-1])
    assert Path(command[0]).resolve() == Path(sys.executable).resolve()
    assert command[1:4] == ["-m", "emorf_jax.predict", "song.mp3"] and command[4] == f"--checkpoint={workdir}/swa"
    track = metadata.read_split(synthetic_tree / "data", 0, "test")[0]
    command[3] = str(synthetic_tree / "audio" / track.path)  # the run trained on prepared data: no demo audio
    tagged = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert tagged.returncode == 0, tagged.stderr
    assert tagged.stdout.startswith(f"{command[3]}\t")


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def test_a_run_reports_each_model_as_the_ensemble_tool_does_which_reads_it_back(reference_run, tmp_path):
    """One layout for one model's report: given a run's model folder as its only member, the ensemble tool writes the
    same files with the same numbers."""
    data_dir, workdir, _ = reference_run
    swa = workdir / "report" / "swa"
    for model in ("final", "selected", "snapshot_ensemble_2"):
        assert _files(workdir / "report" / model) == _files(swa)
    output = tmp_path / "ensemble"
    assert ensemble_command.main([f"--predictions={swa}", f"--data_dir={data_dir}", f"--output_dir={output}"]) == 0
    assert _files(output) == _files(swa)
    assert "submission/predictions.npy" in _files(output)
    for name in _files(swa):
        if name != "precision_recall.png":  # its title names the model
            assert (output / name).read_bytes() == (swa / name).read_bytes(), name


def test_the_demo_names_one_of_its_own_test_tracks_in_the_predict_command(random_checkpoints, synthetic_tree, tmp_path):
    (tmp_path / "swa").symlink_to(random_checkpoints[0])  # a workdir laid out as the demo's
    (tmp_path / "synthetic").symlink_to(synthetic_tree)
    command = shlex.split(demo.predict_command(faresnet.get_config("demo"), str(tmp_path)))
    test_paths = {
        str(tmp_path / "synthetic" / "audio" / t.path) for t in metadata.read_split(synthetic_tree / "data", 0, "test")
    }
    assert command[3] in test_paths and Path(command[3]).is_file()
    assert command[4] == f"--checkpoint={tmp_path}/swa"


def test_the_demo_prepares_its_data_with_command_lines_the_data_tools_accept(tmp_path):
    config = faresnet.get_config("demo")
    *making, building = demo.data_preparation_commands(config, str(tmp_path))
    assert [command[1:3] for command in making] == [["-m", "data_prep.synthetic"]]
    assert building[1:3] == ["-m", "data_prep.build"]
    options = build.parse_options(building[3:])
    assert options.features == config.dataset.config_name and Path(options.data_dir) == tmp_path / "data"
    assert options.subset == "moodtheme"
    config.dataset.synthetic_subset = "genre"  # the synthetic data's tag names, made and prepared alike
    *making, building = demo.data_preparation_commands(config, str(tmp_path))
    assert making[0][making[0].index("--subset") + 1] == "genre" and build.parse_options(building[3:]).subset == "genre"


def test_snapshots_are_where_the_config_puts_them(reference_run):
    data_dir, workdir, _ = reference_run
    config = _test_config(data_dir)
    prepared = load_prepared(data_dir, "hop512")
    steps_per_epoch = input_pipeline.steps_per_epoch(prepared, config.batch_size)
    total = train.epochs_to_steps(config.num_epochs, steps_per_epoch)
    expected = train.snapshot_steps(config, steps_per_epoch, total)
    assert len(expected) >= 2
    assert sorted(int(p.name) for p in (workdir / "snapshots").iterdir() if p.name.isdigit()) == expected


def _restore(workdir: Path, kind: str, step: int | None = None):
    with checkpoints.open_manager(str(workdir), kind, read_only=True) as manager:
        return checkpoints.restore(manager, step)


def test_swa_holds_the_averaged_weights_with_batchnorm_statistics_reestimated_for_them(reference_run):
    """An averaged model with the last model's BatchNorm statistics is another, usually worse, model: `swa/` must
    hold the statistics that the re-estimation (the config's batches from seed + 1, training mode, momentum 0) gives
    the averaged weights, recomputed here from the run's last state."""
    data_dir, workdir, _ = reference_run
    config = _test_config(data_dir)
    prepared = load_prepared(data_dir, "hop512")
    swa, meta = _restore(workdir, checkpoints.SWA)
    last, last_meta = _restore(workdir, checkpoints.LATEST)
    assert meta["step"] == last_meta["step"] and int(last["average_count"]) >= 2
    jax.tree.map(np.testing.assert_array_equal, swa["params"], last["average_params"])
    model = train.create_model(meta["model"], axis_name="batch").clone(bn_momentum=0.0)
    batch_stats_step = jax.pmap(
        functools.partial(train.batch_stats_step, model=model, normalisation=(prepared.mean, prepared.std)),
        axis_name="batch",
        in_axes=(0, 0, 0, None),
    )
    running = jax_utils.replicate(last["batch_stats"])

    def reestimated(params):
        batches = input_pipeline.train_batches(
            prepared,
            global_batch_size=config.batch_size,
            crop_frames=config.input.crop_frames,
            max_time_shift=config.input.max_time_shift,
            seed=config.seed + 1,
        )
        stats = weight_averaging.reestimate_batch_stats(
            lambda params, batch, key: batch_stats_step(params, running, batch, key),
            jax_utils.replicate(params),
            batches,
            config.bn_reestimate_batches,
            jax.random.PRNGKey(config.seed + 1),
        )
        return jax_utils.unreplicate(stats)

    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, swa["batch_stats"], reestimated(last["average_params"]))
    for other in (last["batch_stats"], reestimated(last["params"])):  # the last model's, kept or re-estimated
        differs = jax.tree.leaves(
            jax.tree.map(lambda a, b: not np.allclose(a, b, rtol=1e-3), swa["batch_stats"], other)
        )
        assert sum(differs) > len(differs) / 2


def _logged_scalars(workdir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar of the run's TensorBoard event files, as its metric writer stored it."""
    import tensorflow as tf

    values = {}
    for path in workdir.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def test_best_holds_the_evaluation_with_the_lowest_validation_loss_of_the_run(reference_run):
    """Of every evaluation the run logged, `best/` keeps the one of lowest validation loss (the config's selection),
    and its weights are those that scored it: evaluated again, they give the logged loss."""
    data_dir, workdir, _ = reference_run
    config = _test_config(data_dir)
    assert config.selection_metric == "loss"
    history = _logged_scalars(workdir, "val_loss")
    assert len(history) >= 2 and len(set(history.values())) == len(history), history
    lowest = min(history, key=history.get)
    with checkpoints.open_manager(str(workdir), checkpoints.BEST, read_only=True) as manager:
        assert manager.all_steps() == [lowest], history
    variables, meta = _restore(workdir, checkpoints.BEST, lowest)
    assert meta["validation"]["loss"] == pytest.approx(history[lowest], rel=1e-6)
    predictor = split_predictions.Predictor(
        train.create_model(meta["model"]),
        load_prepared(data_dir, "hop512"),
        window_frames=config.input.eval_window_frames,
        batch_size=config.eval_batch_size,
    )
    scored = predictor.evaluate(variables, "validation", pos_weight=config.loss.pos_weight)
    assert scored["loss"] == pytest.approx(history[lowest], rel=1e-5)


def test_every_checkpoint_the_report_scores_stores_its_validation_thresholds(reference_run):
    """final, selected and SWA: the thresholds of their report folders' validation predictions; each snapshot (in the
    snapshot ensemble or not): those of its own validation predictions, recomputed here from the checkpoint."""
    data_dir, workdir, _ = reference_run
    prepared = load_prepared(data_dir, "hop512")
    labels = prepared.parts["validation"].labels
    saved = {"final": checkpoints.LATEST, "selected": checkpoints.BEST, "swa": checkpoints.SWA}
    for model, kind in saved.items():
        validation = np.load(workdir / "report" / model / "validation_predictions.npy")
        stored_tags, stored = thresholds.read(str(workdir / kind))
        assert stored_tags == list(prepared.tags)
        np.testing.assert_array_equal(stored, metrics.best_f1_thresholds(labels, validation))
        assert thresholds.read(workdir / "report" / model / "thresholds.tsv")[1].tolist() == stored.tolist()
    snapshots = sorted(str(p) for p in (workdir / checkpoints.SNAPSHOTS).iterdir() if p.name.isdigit())
    assert len(snapshots) >= 2
    members, _ = ensemble.checkpoint_members(snapshots, str(data_dir), _test_config(data_dir).eval_batch_size)
    for path, member in zip(snapshots, members):
        validation = np.asarray(member["validation"].probabilities, np.float32)
        np.testing.assert_array_equal(
            thresholds.read(path)[1], metrics.best_f1_thresholds(labels, validation), err_msg=path
        )
    assert "thresholds       per tag, from validation" in model_card(str(workdir / checkpoints.SWA)).splitlines()


def test_tagging_a_tracks_audio_equals_its_evaluation_on_multi_chunk_tracks(reference_run, synthetic_tree):
    """The checkpoint, loaded without the config, tags each test track's MP3 (decoded, features computed) as the
    run's whole-track evaluation scored the same track from its stored chunks."""
    data_dir, workdir, _ = reference_run
    tagger = load_tagger(str(workdir / checkpoints.LATEST))
    prepared = load_prepared(data_dir, "hop512")
    assert tagger.tags == list(prepared.tags)
    assert tagger.meta["model"]["frequency_aware"] is True
    assert tagger.window_frames == _test_config(data_dir).input.eval_window_frames
    final_predictions = np.load(workdir / "report" / "final" / "test_predictions.npy")
    tracks = {track.track_id: track for track in metadata.read_split(synthetic_tree / "data", 0, "test")}
    for row, track_id in enumerate(prepared.track_ids["test"]):
        path = synthetic_tree / "audio" / tracks[track_id].path
        waveform, sample_rate = features.decode_audio(path.read_bytes(), str(path))
        assert prepared.parts["test"].frames[row] > prepared.chunk_frames  # spans several chunks
        probabilities = tagger.tag_audio(waveform, sample_rate)
        np.testing.assert_allclose(list(probabilities.values()), final_predictions[row], rtol=1e-4, atol=1e-6)
    assert prepared.parts["test"].frames.max() > 3 * prepared.chunk_frames
    # The same audio at 48 kHz (resampled by the tagger as data preparation would) scores about the same.
    at_48k = librosa.resample(waveform.T, orig_sr=sample_rate, target_sr=48000).T
    np.testing.assert_allclose(list(tagger.tag_audio(at_48k, 48000).values()), list(probabilities.values()), atol=0.02)


def _has_steps(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _kill_once_saved(command: list[str], saved: Path) -> None:
    """Starts the run and SIGKILLs it as soon as a checkpoint step appears in `saved`."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not _has_steps(saved):
        assert process.poll() is None, f"the run ended before anything was saved in {saved.name}"
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(reference_run, tmp_path):
    data_dir, reference_workdir, _ = reference_run
    workdir = tmp_path / "interrupted"
    _kill_once_saved(_command(data_dir, workdir), workdir / checkpoints.LATEST)
    killed_at, _, _ = _latest_params(workdir)
    reference_step, reference_params, reference_average = _latest_params(reference_workdir)
    assert killed_at < reference_step, "the kill must interrupt the run before its end"

    _run(data_dir, workdir)
    _assert_same_end(workdir, reference_workdir)


def _assert_same_end(workdir: Path, reference_workdir: Path) -> None:
    step, params, average = _latest_params(workdir)
    reference_step, reference_params, reference_average = _latest_params(reference_workdir)
    assert step == reference_step
    for got, want in ((params, reference_params), (average, reference_average)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    report = json.loads((workdir / "report" / "test_report.json").read_text())
    reference_report = json.loads((reference_workdir / "report" / "test_report.json").read_text())
    assert report.keys() == reference_report.keys()
    for name in report:
        assert report[name]["PR-AUC-macro"] == pytest.approx(reference_report[name]["PR-AUC-macro"], abs=1e-6)


def test_a_run_killed_between_an_evaluation_save_and_its_next_checkpoint_resumes(reference_run, tmp_path):
    """With no resumable checkpoint before the end, a kill right after the first evaluation's saves leaves saved
    steps that the restarted run replays: it must skip them and end where an uninterrupted run ends."""
    data_dir, reference_workdir, _ = reference_run
    workdir = tmp_path / "interrupted"
    overrides = ("--config.checkpoint_every_steps=1000",)  # the end of the run is the only resumable checkpoint
    _kill_once_saved(_command(data_dir, workdir, *overrides), workdir / checkpoints.BEST)
    assert not _has_steps(workdir / checkpoints.LATEST), "killed too late: the run had reached its end"

    _run(data_dir, workdir, *overrides)
    _assert_same_end(workdir, reference_workdir)


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
    run_folder.record_config(str(tmp_path / "w4"), first)
    with pytest.raises(ValueError, match=r"another config \(differences: model.rho\)"):
        train.train_and_evaluate(second, str(tmp_path / "w4"))


def test_a_short_run_learns_and_accounts_for_a_missing_test_track(tmp_path_factory, caplog):
    """In process: a larger synthetic set than the shared fixture whose test and validation parts each lose one
    track to data preparation (its MP3 is gone), a small FA-ResNet, about a minute of CPU."""
    from data_prep import preparation, synthetic

    root = tmp_path_factory.mktemp("learnable")
    synthetic.make_synthetic(root, num_tracks=100, seed=1, duration=4.0, duplicate_groups=0)
    lost = {part: metadata.read_split(root / "data", 0, part)[1] for part in ("validation", "test")}
    for track in lost.values():
        (root / "audio" / track.path).unlink()
    preparation.build_dataset(
        preparation.BuildOptions(
            root / "audio",
            root / "data",
            root / "prepared",
            features="hop512",
            split_index=0,
            workers=2,
            progress=False,
            chunk_frames=160,
        )
    )
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
    workdir = tmp_path_factory.mktemp("learnable_run")
    with caplog.at_level("WARNING"):
        report = train.train_and_evaluate(config, str(workdir))
    for part, track in lost.items():
        warning = next(
            r.getMessage() for r in caplog.records if f"{part} tracks are not in the prepared" in r.getMessage()
        )
        assert warning.startswith("1 of the") and "failures.tsv" in warning and track.track_id in warning
    official = metadata.read_split(root / "data", 0, "test")
    rows = (workdir / "report" / "final" / "test_track_ids.txt").read_text().split()
    assert rows == [track.track_id for track in official if track.track_id != lost["test"].track_id]
    assert np.load(workdir / "report" / "final" / "test_predictions.npy").shape[0] == len(rows)
    assert not (workdir / "report" / "final" / "submission").exists()
    with pytest.raises(ValueError, match=f"1 official test tracks are missing \\({lost['test'].track_id}\\)"):
        submission.write_submission(
            str(workdir / "submission"),
            np.zeros((len(rows), 9)),
            np.zeros((len(rows), 9), bool),
            rows,
            [track.track_id for track in official],
        )
    # A snapshot outside the snapshot ensemble stores the thresholds of its own validation predictions too.
    snapshots = sorted((workdir / checkpoints.SNAPSHOTS).glob("[0-9]*"), key=lambda path: int(path.name))
    assert len(snapshots) > config.snapshots.ensemble_size
    (first,), prepared = ensemble.checkpoint_members(
        [str(snapshots[0])], str(root / "prepared"), batch_size=config.eval_batch_size
    )
    validation = np.asarray(first["validation"].probabilities, np.float32)
    expected = metrics.best_f1_thresholds(prepared.parts["validation"].labels, validation)
    np.testing.assert_array_equal(thresholds.read(str(snapshots[0]))[1], expected)
    positive_rate = report["constant_predictor"]["PR-AUC-macro"]
    assert report["final"]["PR-AUC-macro"] > positive_rate + 0.15, report
    assert report["final"]["ROC-AUC-macro"] > 0.6, report  # chance is 0.5; the test split has ~25 tracks


def test_compilation_cache_keeps_compiled_programs_in_the_workdir(tmp_path):
    """--compilation_cache_dir (relative: in the workdir) is where a run's compiled programs go."""
    program = (
        "import sys, jax, jax.numpy as jnp; from emorf_jax import distributed; "
        "distributed.use_compilation_cache('xla_cache', sys.argv[1]); jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3))"
    )
    environment = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    environment["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    result = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert result.returncode == 0, stderr_excerpt(result.stderr)
    assert any((tmp_path / "xla_cache").iterdir())
