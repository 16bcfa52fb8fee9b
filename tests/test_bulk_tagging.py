"""Bulk tagging (`emorf_jax.predict`, the library of `python -m emorf_jax.predict`) on real MP3s with real checkpoints:
a run killed with SIGKILL and resumed, a rerun that skips and appends, decisions, embeddings, short clips in one
compiled shape, and feature processes without JAX."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile
from scipy.special import expit

from data_prep import metadata
from emorf_jax import checkpoints, split_predictions, tagger, track_features, windowing
from emorf_jax import thresholds as thresholds_io
from emorf_jax.models.layers import BN_EPSILON
from emorf_jax.predict import __main__ as predict_command

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mp3_folder(synthetic_tree, tmp_path_factory) -> Path:
    """Twelve real MP3s of the synthetic dataset (a median 6 s each) in one folder."""
    folder = tmp_path_factory.mktemp("collection")
    for track in metadata.read_split(synthetic_tree / "data", 0, "train")[:12]:
        shutil.copy(synthetic_tree / "audio" / track.path, folder / Path(track.path).name)
    return folder


def _command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "emorf_jax.predict", "--no_progress", *arguments]


def _predict(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*arguments), cwd=REPO, capture_output=True, text=True, timeout=600)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _running(pid: str) -> bool:
    """Whether a process exists and has not ended (a zombie waits for its parent to collect it, which is over)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _taggram(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_killed_mid_folder_keeps_its_rows_and_a_rerun_adds_the_others_once(
    mp3_folder, random_checkpoints, tmp_path
):
    flags = [str(mp3_folder), f"--checkpoint={random_checkpoints[0]}", "--taggram", "--embeddings", "--workers=1"]
    reference = tmp_path / "reference.jsonl"
    assert _predict(*flags, f"--output={reference}").returncode == 0
    output = tmp_path / "tags.jsonl"
    run = subprocess.Popen(_command(*flags, f"--output={output}"), cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (output.exists() and output.read_bytes().count(b"\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.poll() is None, "the run ended before it could be killed"
    workers = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
    assert workers  # the feature process (and multiprocessing's resource tracker)
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 10
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(_running, workers)), "the killed run left processes behind"
    finished = _jsonl(output)
    assert 3 <= len(finished) < 12  # killed mid-folder, its finished rows kept
    rerun = _predict(*flags, f"--output={output}")
    assert rerun.returncode == 0, rerun.stderr
    assert f"holds {len(finished)} of these files: tagging the other {12 - len(finished)}" in rerun.stderr
    rows, expected = _jsonl(output), _jsonl(reference)
    assert rows[: len(finished)] == finished
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in mp3_folder.iterdir())  # each file once
    model = tagger.load_tagger(random_checkpoints[0])
    tags = model.tags
    by_path = {row["path"]: row for row in expected}
    for row in rows:
        np.testing.assert_allclose([row[t] for t in tags], [by_path[row["path"]][t] for t in tags], rtol=1e-6)
    # The side files follow the output's rows: one embedding per row, one taggram row and embedding per window.
    embeddings, expected_embeddings = (np.load(tmp_path / f"{stem}.embeddings.npy") for stem in ("tags", "reference"))
    assert embeddings.shape == (12, 4 * model.meta["model"]["base_channels"]) and embeddings.dtype == np.float32
    order = {row["path"]: i for i, row in enumerate(expected)}
    np.testing.assert_allclose(embeddings, expected_embeddings[[order[row["path"]] for row in rows]], rtol=1e-5)
    windows, expected_windows = _taggram(tmp_path / "tags.taggram.csv"), _taggram(tmp_path / "reference.taggram.csv")
    assert sorted((w["path"], w["end_s"]) for w in windows) == sorted((w["path"], w["end_s"]) for w in expected_windows)
    assert np.load(tmp_path / "tags.taggram_embeddings.npy").shape == (len(windows), model.embedding_size)


def test_a_rerun_skips_the_files_in_the_output_and_appends_the_others(mp3_folder, random_checkpoints, tmp_path):
    files = sorted(str(p) for p in mp3_folder.iterdir())[:5]
    output = tmp_path / "tags.csv"
    assert _predict(*files[:3], f"--checkpoint={random_checkpoints[0]}", f"--output={output}").returncode == 0
    first = output.read_bytes()
    with output.open("ab") as f:  # a row that a killed run was writing when it died
        f.write(b"/music/half.mp3,0.12")
    rerun = _predict(*files, f"--checkpoint={random_checkpoints[0]}", f"--output={output}", "--workers=0")
    assert rerun.returncode == 0, rerun.stderr
    assert "holds 3 of these files: tagging the other 2" in rerun.stderr
    text = output.read_bytes()
    assert text.startswith(first) and b"half.mp3" not in text
    with output.open(newline="") as f:
        assert [row["path"] for row in csv.DictReader(f)] == files
    # Another model's columns are not mixed into it.
    other = tmp_path / "thresholds.tsv"
    other.write_text("".join(f"{tag}\t0.5\n" for tag in tagger.load_tagger(random_checkpoints[0]).tags))
    mixed = _predict(
        *files, f"--checkpoint={random_checkpoints[0]}", f"--output={output}", "--decisions", f"--thresholds={other}"
    )
    assert mixed.returncode == 2 and "other columns" in mixed.stderr


def test_decisions_are_the_tags_strictly_above_their_thresholds(mp3_folder, random_checkpoints, tmp_path):
    files = sorted(str(p) for p in mp3_folder.iterdir())[:4]
    model = tagger.load_tagger(random_checkpoints[0])
    probabilities = np.array([model.tag_file(path).probabilities for path in files])
    # Per tag, a threshold between the files' probabilities, one equal to the first file's (not above it: not
    # decided), and one infinite (a tag without a positive validation track: never decided).
    thresholds = np.median(probabilities, axis=0)
    thresholds[0], thresholds[1] = probabilities[0, 0], np.inf
    thresholds_file = tmp_path / "thresholds.tsv"
    thresholds_file.write_text("".join(f"{tag}\t{t!r}\n" for tag, t in zip(model.tags, thresholds.tolist())))
    output = tmp_path / "decided.jsonl"
    result = _predict(
        *files,
        f"--checkpoint={random_checkpoints[0]}",
        f"--output={output}",
        "--decisions",
        f"--thresholds={thresholds_file}",
    )
    assert result.returncode == 0, result.stderr
    rows = _jsonl(output)
    short = [metadata.short_tag_name(tag) for tag in model.tags]
    for row, file_probabilities in zip(rows, probabilities):
        expected = [short[i] for i in np.flatnonzero(file_probabilities > thresholds)]
        assert row["decisions"] == expected and 0 < len(expected) < len(short)
        assert [row[tag] for tag in model.tags] == pytest.approx(file_probabilities.tolist(), rel=1e-6)
    assert short[0] not in rows[0]["decisions"] and all(short[1] not in row["decisions"] for row in rows)
    # The thresholds stored in a checkpoint's meta serve without --thresholds.
    variables, meta = checkpoints.load_checkpoint(random_checkpoints[0])
    with checkpoints.open_manager(str(tmp_path / "run"), checkpoints.SWA) as manager:
        checkpoints.save(manager, 10, variables, meta)
    stored = str(tmp_path / "run" / checkpoints.SWA)
    thresholds_io.write(stored, model.tags, thresholds.tolist())
    from_meta = tmp_path / "from_meta.jsonl"
    assert _predict(*files, f"--checkpoint={stored}", f"--output={from_meta}", "--decisions").returncode == 0
    assert [row["decisions"] for row in _jsonl(from_meta)] == [row["decisions"] for row in rows]
    # Without stored thresholds, or for an average of checkpoints, --thresholds is needed and the error says so.
    missing = _predict(files[0], f"--checkpoint={random_checkpoints[0]}", "--decisions")
    assert missing.returncode == 2 and "holds no decision thresholds" in missing.stderr
    assert "pass --thresholds" in missing.stderr and "retrain" not in missing.stderr
    several = _predict(files[0], *(f"--checkpoint={c}" for c in random_checkpoints), "--decisions")
    assert several.returncode == 2 and "several checkpoints are averaged" in several.stderr


def test_a_file_that_fails_gets_a_nan_embeddings_row_and_the_others_keep_theirs(
    mp3_folder, random_checkpoints, tmp_path
):
    """`--embeddings` keeps row i for the output's row i: a file that cannot be decoded, among good ones, gets a
    NaN row (and no taggram row), and the good files after it keep their own embeddings."""
    good = sorted(mp3_folder.iterdir())[:3]
    folder = tmp_path / "music"
    folder.mkdir()
    for path in good:
        shutil.copy(path, folder / path.name)
    broken = folder / f"{good[1].stem}_broken.mp3"  # sorts between the good files
    broken.write_bytes(b"ID3" + bytes(range(256)) * 8)
    output = tmp_path / "tags.csv"
    flags = [str(folder), f"--checkpoint={random_checkpoints[0]}", f"--output={output}", "--embeddings", "--taggram"]
    result = _predict(*flags, "--workers=1")
    assert result.returncode == 1 and "cannot decode" in result.stderr, result.stderr
    with output.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(row["path"]).name for row in rows) == sorted([broken.name, *(path.name for path in good)])
    embeddings = np.load(tmp_path / "tags.embeddings.npy")
    model = tagger.load_tagger(random_checkpoints[0])
    assert embeddings.shape == (4, model.embedding_size) and embeddings.dtype == np.float32
    for row, embedding in zip(rows, embeddings):
        if Path(row["path"]) == broken:
            assert row["error"] and np.isnan(embedding).all()
        else:
            assert not row["error"]
            np.testing.assert_allclose(embedding, model.tag_file(row["path"]).embedding, rtol=1e-5, atol=1e-6)
    windows = _taggram(tmp_path / "tags.taggram.csv")
    assert broken.name not in {Path(window["path"]).name for window in windows}
    assert np.isfinite(np.load(tmp_path / "tags.taggram_embeddings.npy")).all()


def test_embeddings_are_the_last_blocks_channels_averaged_as_the_logits_are(mp3_folder, random_checkpoints):
    """A CP-ResNet's embedding is its last block's output averaged over frequency and time (computed here from the
    checkpoint's variables); the track's is its windows' averaged with the window weights, and the 1x1 head and
    BatchNorm applied to a window's embedding give that window's logits."""
    model = tagger.load_tagger(random_checkpoints[0])
    member = model.members[0]
    path = sorted(mp3_folder.iterdir())[0]
    track = model.tag_file(path)
    assert track.embedding.shape == (model.embedding_size,) == (4 * member.meta["model"]["base_channels"],)
    assert track.window_embeddings.shape == (len(track.windows), model.embedding_size) and len(track.windows) > 1
    stored = track_features.stored(model.read_features(path))
    norm = member.meta["normalisation"]
    direct = []
    for start, stop, _ in track.windows:
        inputs = windowing.model_input(stored[None, start:stop], np.float32(norm["mean"]), np.float32(norm["std"]))
        _, state = member.model.apply(
            member.variables,
            inputs,
            rngs={"shift": jax.random.PRNGKey(split_predictions.EVALUATION_SHIFT_SEED)},
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        direct.append(np.asarray(state["intermediates"]["stage3_block4"]["__call__"][0]).mean(axis=(1, 2))[0])
    np.testing.assert_allclose(track.window_embeddings, direct, rtol=1e-5, atol=1e-6)
    weights = np.array([weight for _, _, weight in track.windows], np.float64)
    np.testing.assert_allclose(track.embedding, weights @ np.array(direct) / weights.sum(), rtol=1e-5, atol=1e-6)
    params, stats = member.variables["params"], member.variables["batch_stats"]["feed_forward_bn"]
    head = track.window_embeddings @ params["feed_forward_conv"]["kernel"][0, 0]
    head = (head - stats["mean"]) / np.sqrt(stats["var"] + BN_EPSILON) * params["feed_forward_bn"]["scale"]
    head += params["feed_forward_bn"]["bias"]
    np.testing.assert_allclose(expit(head), track.window_probabilities, rtol=1e-4, atol=1e-6)


def test_short_clips_of_any_length_share_one_compiled_program_and_keep_their_scores(random_checkpoints, mp3_folder):
    """Clips shorter than a window run zero-padded to it with their length as `frames`: one program for all five
    lengths, and the scores of running each clip in its own shape (the path before) to float rounding."""
    model = tagger.load_tagger(random_checkpoints[0])
    stored = track_features.stored(model.read_features(sorted(mp3_folder.iterdir())[0]))
    norm = model.meta["normalisation"]
    mean, std = np.float32(norm["mean"]), np.float32(norm["std"])
    own_shape = jax.jit(split_predictions.logits_step, static_argnames="model")
    lengths = [20, 41, 64, 97, model.window_frames - 1]
    model.tag_stored(stored[: lengths[0]])
    compiled = tagger._jitted_window_outputs._cache_size()
    differences = []
    for frames in lengths:
        clip = model.tag_stored(stored[:frames])
        assert clip.windows == [(0, frames, frames)]
        before = expit(
            np.asarray(
                own_shape(model.members[0].variables, stored[None, :frames], mean, std, model=model.members[0].model)
            )
        )[0]
        differences.append(float(np.abs(clip.probabilities - before).max()))
    assert tagger._jitted_window_outputs._cache_size() == compiled  # no compilation for the other lengths
    assert max(differences) < 1e-5, differences


def test_the_feature_processes_import_no_jax(tmp_path):
    """A spawned feature process of `predict` imports the module of its function, not the model's libraries: the
    real process, once it has sent a file's features, has no shared library of jaxlib (which JAX, Flax, optax and
    orbax load) or TensorFlow in its memory map (a package's `__main__`, as `python -m emorf_jax.predict` runs, is
    not run again in a spawned child, as `-c` code is not)."""
    song = tmp_path / "song.wav"
    soundfile.write(song, np.random.default_rng(0).normal(0, 0.1, (44100, 2)), 44100)
    code = (
        "from pathlib import Path\n"
        "from data_prep.deadline import DEFAULT_DEADLINE\n"
        "from data_prep.features import FeatureSettings\n"
        "from emorf_jax import predict\n"
        f"processes = predict._FeatureProcesses([{str(song)!r}], FeatureSettings(), 1, DEFAULT_DEADLINE)\n"
        "processes.give(0)\n"
        "worker = processes.holder(0)\n"
        "blocks = list(processes.blocks(worker, 0))\n"
        "maps = Path(f'/proc/{worker.process.pid}/maps').read_text()\n"
        "print(len(blocks) > 0, sorted(lib for lib in ('jaxlib', 'tensorflow') if lib in maps))\n"
        "processes.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True []", result.stderr


def test_the_onnxruntime_backend_gives_the_jax_rows_embeddings_and_short_clip_scores(
    mp3_folder, random_checkpoints, tmp_path, monkeypatch
):
    """`--backend onnxruntime` runs each checkpoint's ONNX export (cached in TMPDIR, exported once) on the same
    windows: two checkpoints averaged give the JAX backend's probabilities, taggram and embeddings (rtol 1e-4), and
    a clip shorter than a window, run unpadded, the scores JAX gives it padded and masked."""
    pytest.importorskip("onnxruntime")
    files = sorted(str(p) for p in mp3_folder.iterdir())[:4]
    flags = [*files, *(f"--checkpoint={c}" for c in random_checkpoints), "--taggram", "--embeddings"]
    for backend in ("jax", "onnxruntime"):
        result = subprocess.run(
            _command(*flags, f"--output={tmp_path / backend}.jsonl", f"--backend={backend}"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
        assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "emorf_jax_onnx").glob("*.onnx"))) == len(random_checkpoints)
    jax_rows, onnx_rows = _jsonl(tmp_path / "jax.jsonl"), _jsonl(tmp_path / "onnxruntime.jsonl")
    assert [row["path"] for row in onnx_rows] == files and [row["error"] for row in onnx_rows] == [None] * 4
    tags = [tag for tag in jax_rows[0] if tag.startswith("mood/theme---")]
    assert tags
    np.testing.assert_allclose(
        [[row[tag] for tag in tags] for row in onnx_rows], [[row[tag] for tag in tags] for row in jax_rows], rtol=1e-4
    )
    for side in ("embeddings.npy", "taggram_embeddings.npy"):
        jax_side, onnx_side = (np.load(tmp_path / f"{backend}.{side}") for backend in ("jax", "onnxruntime"))
        assert onnx_side.shape == jax_side.shape and len(jax_side) >= len(files)
        np.testing.assert_allclose(onnx_side, jax_side, rtol=1e-4, atol=1e-5)
    jax_taggram, onnx_taggram = (_taggram(tmp_path / f"{backend}.taggram.csv") for backend in ("jax", "onnxruntime"))
    assert [row["end_s"] for row in onnx_taggram] == [row["end_s"] for row in jax_taggram]
    np.testing.assert_allclose(
        [[float(row[tag]) for tag in tags] for row in onnx_taggram],
        [[float(row[tag]) for tag in tags] for row in jax_taggram],
        rtol=1e-4,
    )
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the cache the command filled
    with_jax = tagger.load_tagger(random_checkpoints[0], backend="jax")
    with_onnx = tagger.load_tagger(random_checkpoints[0], backend="onnxruntime")
    clip = track_features.stored(with_jax.read_features(files[0]))[:41]
    np.testing.assert_allclose(
        with_onnx.tag_stored(clip).probabilities, with_jax.tag_stored(clip).probabilities, rtol=1e-4
    )


def test_the_onnxruntime_backend_without_onnxruntime_says_how_to_install_it(
    random_checkpoints, mp3_folder, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # its import then raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        predict_command.main([str(mp3_folder), f"--checkpoint={random_checkpoints[0]}", "--backend=onnxruntime"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "onnxruntime backend needs onnxruntime" in error and "pip install -e ." in error
