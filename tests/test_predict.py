"""`python -m emorf_jax.predict` on real audio files of every format, rate and channel count, with real checkpoints
(the library it runs, `emorf_jax.tagger`, has its own tests in test_tagger.py)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile

from data_prep import metadata
from emorf_jax import tagger

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def audio_folder(synthetic_tree, tmp_path_factory):
    """One synthetic track written as MP3, WAV, FLAC and OGG at 22.05, 44.1 and 48 kHz, mono and stereo, plus a
    corrupt MP3 and a text file named like audio."""
    track = metadata.read_split(synthetic_tree / "data", 0, "test")[0]
    stereo, rate = soundfile.read(synthetic_tree / "audio" / track.path, dtype="float32")
    folder = tmp_path_factory.mktemp("my_music")
    for suffix, subtype, target_rate, channels in [
        ("mp3", None, 44100, 2),
        ("mp3", None, 22050, 1),
        ("wav", "PCM_16", 48000, 2),
        ("wav", "FLOAT", 44100, 1),
        ("flac", None, 48000, 1),
        ("flac", None, 22050, 2),
        ("ogg", None, 44100, 2),
        ("ogg", None, 48000, 1),
    ]:
        waveform = stereo if channels == 2 else stereo.mean(axis=1, keepdims=True)
        if target_rate != rate:
            waveform = librosa.resample(waveform.T, orig_sr=rate, target_sr=target_rate).T
        name = folder / "nested" / f"song_{target_rate}_{channels}ch.{suffix}"
        name.parent.mkdir(exist_ok=True)
        soundfile.write(name, np.clip(waveform, -1, 1), target_rate, subtype=subtype)
    (folder / "broken.mp3").write_bytes(b"ID3" + bytes(range(256)) * 8)
    (folder / "notes.ogg").write_text("not audio at all")
    return folder


def _predict(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emorf_jax.predict", "--no_progress", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_format_rate_and_channel_count_is_tagged_and_bad_files_are_named(
    audio_folder, random_checkpoints, tmp_path
):
    output = tmp_path / "tags.csv"
    result = _predict(str(audio_folder), f"--checkpoint={random_checkpoints[0]}", f"--output={output}")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line and "WARNING" not in line]
    assert len(errors) == 2
    assert any("broken.mp3" in line and "cannot decode" in line for line in errors)
    assert any("notes.ogg" in line for line in errors)
    with output.open() as f:
        rows = list(csv.DictReader(f))
    tags = tagger.load_tagger(random_checkpoints[0]).tags
    assert list(rows[0]) == ["path", *tags, "top_tags", "error"]
    # Each file has its row; the two that cannot be read, with their reason and no scores.
    failed = {Path(row["path"]).name: row["error"] for row in rows if row["error"]}
    assert sorted(failed) == ["broken.mp3", "notes.ogg"] and "cannot decode" in failed["broken.mp3"]
    assert all(row[tags[0]] == "" for row in rows if row["error"])
    rows = [row for row in rows if not row["error"]]
    assert len(rows) == 8 and all(Path(row["path"]).parent.name == "nested" for row in rows)
    scores = {Path(row["path"]).name: np.array([float(row[tag]) for tag in tags]) for row in rows}
    reference = scores["song_44100_2ch.mp3"]
    # Other rates, channel counts and codecs give close scores for the same music.
    np.testing.assert_allclose(scores["song_48000_2ch.wav"], reference, atol=0.03)
    for name, values in scores.items():
        np.testing.assert_allclose(values, reference, atol=0.08, err_msg=name)


def test_an_ensemble_of_random_checkpoints_is_the_mean_of_each_alone(audio_folder, random_checkpoints, tmp_path):
    files = [str(audio_folder / "nested" / "song_44100_2ch.mp3"), str(audio_folder / "nested" / "song_48000_1ch.flac")]
    outputs = []
    for checkpoint_arguments in (
        [f"--checkpoint={random_checkpoints[0]}"],
        [f"--checkpoint={random_checkpoints[1]}"],
        [f"--checkpoint={c}" for c in random_checkpoints],
    ):
        output = tmp_path / f"out{len(outputs)}.json"
        assert _predict(*files, *checkpoint_arguments, f"--output={output}", "--taggram").returncode == 0
        outputs.append(json.loads(output.read_text()))
    for path in files:
        alone = [np.array(list(o[path].values())) for o in outputs[:2]]
        np.testing.assert_allclose(list(outputs[2][path].values()), np.mean(alone, axis=0), rtol=1e-5)
        assert not np.allclose(alone[0], alone[1])  # two different models
    # The ensemble's taggram: each file's windows, in seconds, with the library's window probabilities.
    ensemble = tagger.load_tagger(random_checkpoints)
    with (tmp_path / "out2.taggram.csv").open() as f:
        rows = list(csv.DictReader(f))
    for path in files:
        track = ensemble.tag_file(path)
        mine = [row for row in rows if row["path"] == path]
        assert [float(row["end_s"]) for row in mine] == [
            round(stop * ensemble.seconds_per_frame, 2) for _, stop, _ in track.windows
        ]
        got = [[float(row[tag]) for tag in ensemble.tags] for row in mine]
        np.testing.assert_allclose(got, track.window_probabilities, atol=1e-6)


def test_describe_prints_the_model_card(random_checkpoints):
    result = _predict(f"--describe={random_checkpoints[0]}")
    assert result.returncode == 0
    assert "FA-ResNet, rho=2" in result.stdout and "window           128 frames" in result.stdout
    assert "calm christmas deep" in result.stdout


def test_usage_errors_exit_with_status_2(random_checkpoints, tmp_path):
    assert _predict("x.mp3", "--checkpoint=/no/such/checkpoint").returncode == 2
    assert _predict(str(tmp_path), f"--checkpoint={random_checkpoints[0]}").returncode == 2  # no audio inside
    assert tagger.audio_files([str(tmp_path)]) == []
