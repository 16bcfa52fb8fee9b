"""The batch step end to end on the synthetic tree: shards, labels, features, stats, resumption, bad input."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from data_prep import build, essentia_like, extract, features, layout, metadata, preparation, reader, synthetic
from data_prep.reader import PARTS, load_prepared

from .conftest import CHUNK_FRAMES, SYNTHETIC_TRACKS

REPO_ROOT = Path(__file__).resolve().parents[1]


def _examples(prepared: reader.PreparedDataset, part: str) -> list[dict]:
    """The TFRecord examples of a part as TFDS decodes them: the shards are a plain TFDS dataset."""
    return list(tfds.builder_from_directory(str(prepared.directory)).as_dataset(split=part).as_numpy_iterator())


def _whole_tracks(examples: list[dict]) -> dict[str, dict]:
    """Chunks concatenated per track, relying on the documented order (a track's chunks are consecutive)."""
    tracks: dict[str, dict] = {}
    for example in examples:
        track_id = example["track_id"].decode()
        if example["chunk_index"] == 0:
            assert track_id not in tracks, f"{track_id} starts twice"
            tracks[track_id] = {**example, "chunks": [example["spectrogram"]]}
        else:
            assert list(tracks)[-1] == track_id, f"chunk {example['chunk_index']} of {track_id} out of order"
            tracks[track_id]["chunks"].append(example["spectrogram"])
    for track in tracks.values():
        assert len(track["chunks"]) == track["num_chunks"]
        track["spectrogram"] = np.concatenate(track["chunks"], axis=0).T  # stored time-major
    return tracks


def test_shards_hold_every_track_of_every_part_with_the_tsv_labels(synthetic_tree, prepared_data_dir):
    prepared = load_prepared(*prepared_data_dir)
    tags = metadata.read_tag_list(synthetic_tree / "data")
    assert prepared.tags == tags
    assert prepared.failures == {}
    for part in PARTS:
        expected = metadata.read_split(synthetic_tree / "data", 0, part)
        examples = _examples(prepared, part)
        tracks = _whole_tracks(examples)
        assert list(tracks) == [track.track_id for track in expected] == list(prepared.track_ids[part])
        assert prepared.num_examples[part] == len(examples)
        for track in expected:
            stored = tracks[track.track_id]
            np.testing.assert_array_equal(stored["labels"], metadata.multi_hot(track.tags, tags))
            assert stored["artist_id"].decode() == track.artist_id
            assert stored["duration"] == np.float32(track.duration)
            assert stored["num_frames"] == stored["spectrogram"].shape[1]


@pytest.mark.parametrize("subset", ["genre", "instrument", "top50tags"])
def test_each_subsets_synthetic_data_builds_with_that_subsets_tags(synthetic_tree, prepared_data_dir, tmp_path, subset):
    """The session tree's audio under another subset's names (the same arguments), built from the session's feature
    cache: the shards store that subset's tags, each column the same tracks as its planted sound's mood column."""
    tree = tmp_path / "tree"
    synthetic.make_synthetic(tree, num_tracks=SYNTHETIC_TRACKS, seed=0, long_tracks=1, subset=subset, with_audio=False)
    data_dir, config_name = prepared_data_dir
    options = preparation.BuildOptions(
        synthetic_tree / "audio",
        tree / "data",
        tmp_path / "prepared",
        subset=subset,
        workers=2,
        progress=False,
        chunk_frames=CHUNK_FRAMES,
        cache_dir=data_dir / "cache" / config_name,
    )
    summary = preparation.build_dataset(options)
    prepared, moodtheme = load_prepared(tmp_path / "prepared"), load_prepared(*prepared_data_dir)
    assert prepared.tags == metadata.read_tag_list(tree / "data", subset) == summary.tags
    assert f"tags: {len(prepared.tags)} (MTG-Jamendo {subset})" in str(summary)
    assert prepared.track_ids == moodtheme.track_ids and summary.failures == {}
    rule_of = {name: rule for rule, name in synthetic.SUBSET_TAGS[subset].items()}
    for part in PARTS:
        for column, tag in enumerate(prepared.tags):
            mood_column = moodtheme.tags.index(synthetic.SUBSET_TAGS["moodtheme"][rule_of[tag]])
            np.testing.assert_array_equal(
                prepared.parts[part].labels[:, column], moodtheme.parts[part].labels[:, mood_column]
            )
    assert f'"subset": "{subset}"' in (prepared.directory / "metadata.json").read_text()
    with pytest.raises(preparation.BuildError, match=f"holds MTG-Jamendo's {subset} subset .* of its own"):
        preparation.build_dataset(
            dataclasses.replace(options, subset="moodtheme", metadata_dir=synthetic_tree / "data")
        )


def test_tracks_are_split_into_time_major_chunks_of_at_most_chunk_frames(prepared_data_dir):
    prepared = load_prepared(*prepared_data_dir)
    examples = [example for part in PARTS for example in _examples(prepared, part)]
    assert all(example["spectrogram"].shape[1] == 256 for example in examples)
    lengths = [example["spectrogram"].shape[0] for example in examples]
    assert max(lengths) == prepared.chunk_frames == CHUNK_FRAMES
    assert min(example["num_chunks"] for example in examples) >= 2  # every test track spans several chunks
    assert all(example["spectrogram"].dtype == np.float16 for example in examples)


def test_the_record_index_reads_any_frames_as_tfds_decodes_them(prepared_data_dir):
    prepared = load_prepared(*prepared_data_dir)
    frame_reader = reader.FrameReader(prepared)
    for part in PARTS:
        tracks = _whole_tracks(_examples(prepared, part))
        assert list(tracks) == list(prepared.track_ids[part])
        for number, track in enumerate(tracks.values()):
            whole = track["spectrogram"].T
            np.testing.assert_array_equal(frame_reader.read(part, number), whole)
            np.testing.assert_array_equal(prepared.parts[part].labels[number], track["labels"])
            assert prepared.parts[part].frames[number] == track["num_frames"] == len(whole)
            # A run of frames across a chunk edge reads exactly its own bytes.
            start, stop = CHUNK_FRAMES - 7, min(CHUNK_FRAMES + 30, len(whole))
            before = frame_reader.bytes_read
            np.testing.assert_array_equal(frame_reader.read(part, number, start, stop), whole[start:stop])
            assert frame_reader.bytes_read - before == (stop - start) * 256 * 2
    with pytest.raises(IndexError, match="outside track"):
        frame_reader.read("test", 0, 0, int(prepared.parts["test"].frames[0]) + 1)
    frame_reader.close()


def test_stored_spectrogram_equals_a_direct_computation(synthetic_tree, prepared_data_dir):
    prepared = load_prepared(*prepared_data_dir)
    tracks = _whole_tracks(_examples(prepared, "test"))
    longest = max(metadata.read_split(synthetic_tree / "data", 0, "test"), key=lambda track: track.duration)
    waveform, sample_rate = soundfile.read(synthetic_tree / "audio" / longest.path, dtype="float32")
    direct = features.spectrogram(waveform, sample_rate)
    np.testing.assert_array_equal(tracks[longest.track_id]["spectrogram"], direct.astype(np.float16))


def test_normalisation_stats_are_over_all_training_frames(prepared_data_dir):
    prepared = load_prepared(*prepared_data_dir)
    frames = np.concatenate([ex["spectrogram"] for ex in _examples(prepared, "train")]).T.astype(np.float64)
    assert prepared.mean.shape == prepared.std.shape == (256,)
    assert prepared.mean.dtype == prepared.std.dtype == np.float32
    np.testing.assert_allclose(prepared.mean, frames.mean(axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(prepared.std, frames.std(axis=1), rtol=1e-5)


def test_the_read_side_needs_no_writer_and_no_tensorflow(prepared_data_dir):
    data_dir, config_name = prepared_data_dir
    script = (
        "import sys\n"
        "from data_prep import reader\n"
        f"prepared = reader.load_prepared({str(data_dir)!r}, {config_name!r}, 0)\n"
        "assert 'tensorflow' not in sys.modules and 'librosa' not in sys.modules\n"
        "from emorf_jax import main, train\n"  # TensorBoard's writer brings TensorFlow, but no data_prep writer
        "writers = [m for m in ('data_prep.build', 'data_prep.preparation', 'data_prep.shard_writer',\n"
        "                       'data_prep.extract', 'data_prep.synthetic', 'data_prep.essentia_like')\n"
        "           if m in sys.modules]\n"
        "assert not writers, writers\n"
        "print(prepared.num_examples['train'], prepared.features['hop_length'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    expected = load_prepared(data_dir, config_name)
    assert result.stdout.split() == [str(expected.num_examples["train"]), "512"]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("features", "hop9", "unknown config 'hop9'"),
        ("drop_duplicates", "some", "drop_duplicates='some'"),
        ("split_index", -1, "split_index=-1: need at least 0"),
        ("workers", 0, "workers=0: need at least 1"),
        ("tracks_per_worker", 0, "tracks_per_worker=0: need at least 1"),
        ("chunk_frames", 0, "chunk_frames=0: need at least 1"),
        ("memory_budget_gb", 0.0, "memory_budget_gb=0.0: must be positive"),
    ],
)
def test_build_options_refuse_a_bad_value_before_any_work(tmp_path, name, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        preparation.BuildOptions(tmp_path / "audio", tmp_path / "data", tmp_path / "out", **{name: value})
    assert not list(tmp_path.iterdir())


def test_the_command_turns_its_flags_into_options_and_a_bad_value_into_one_usage_error(capsys):
    required = ["--audio_dir", "A", "--metadata_dir", "M", "--data_dir", "D"]
    options = build.parse_options([*required, "--features", "hop1536", "--split", "2", "--no_progress"])
    assert (options.features, options.split_index, options.progress) == ("hop1536", 2, False)
    with pytest.raises(SystemExit):
        build.parse_options([*required, "--workers", "0"])
    assert "error: workers=0: need at least 1" in capsys.readouterr().err


def test_absent_dataset_error_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m data_prep\.build .*--features hop1536 --split 3"):
        load_prepared(tmp_path, "hop1536", 3)


def _shard_bytes(data_dir: Path, config_name: str) -> dict[str, bytes]:
    directory = layout.dataset_dir(data_dir, config_name, 0)
    return {path.name: path.read_bytes() for path in sorted(directory.glob("*.tfrecord*"))}


def _cli(tree: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "data_prep.build",
        "--audio_dir",
        str(tree / "audio"),
        "--metadata_dir",
        str(tree / "data"),
        "--data_dir",
        str(data_dir),
        "--workers",
        "2",
        "--no_progress",
        "--chunk_frames",
        str(CHUNK_FRAMES),
        *extra,
    ]


def test_build_killed_half_way_resumes_and_gives_identical_shards(synthetic_tree, prepared_data_dir, tmp_path):
    journal = tmp_path / "cache" / "hop512" / extract.JOURNAL_NAME
    process = subprocess.Popen(
        _cli(synthetic_tree, tmp_path),
        cwd=REPO_ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 4):
        assert process.poll() is None, "the build ended before it could be killed"
        assert time.monotonic() < deadline, "no journal entries within 120 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = len(journal.read_text().splitlines())
    total = sum(len(metadata.read_split(synthetic_tree / "data", 0, part)) for part in PARTS)
    assert finished_before < total, "the kill came too late to test resumption"

    system_temporary = tmp_path / "system_temporary"
    system_temporary.mkdir()
    environment = {**os.environ, "TMPDIR": str(system_temporary)}
    subprocess.run(_cli(synthetic_tree, tmp_path), cwd=REPO_ROOT, check=True, capture_output=True, env=environment)

    assert not list(system_temporary.iterdir())  # the build leaves nothing in the system's temporary folder
    records = journal.read_text().splitlines()
    assert len(records) == total, "a track finished before the kill was extracted again"
    clean = _shard_bytes(*prepared_data_dir)
    assert clean and _shard_bytes(tmp_path, "hop512") == clean


def _spawned_workers(pid: int) -> list[int]:
    """Process ids of the extraction workers among a process's children (not the resource tracker)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children += [int(child) for child in (task / "children").read_text().split()]
    return [child for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def test_build_survives_a_killed_worker_and_gives_identical_shards(synthetic_tree, prepared_data_dir, tmp_path):
    process = subprocess.Popen(
        _cli(synthetic_tree, tmp_path), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (workers := _spawned_workers(process.pid)):
        assert process.poll() is None and time.monotonic() < deadline, "no worker was started"
        time.sleep(0.01)
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)

    assert process.returncode == 0, stderr
    assert "a worker died" in stderr
    assert load_prepared(tmp_path).failures == {}
    assert _shard_bytes(tmp_path, "hop512") == _shard_bytes(*prepared_data_dir)


def _break_inputs(tree: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the tree's audio with one missing, empty, corrupt, truncated and wrong-rate file each."""
    audio = tmp_path / "audio"
    shutil.copytree(tree / "audio", audio)
    train = metadata.read_split(tree / "data", 0, "train")
    by_length = sorted(train, key=lambda track: -track.duration)
    broken = dict(zip(("truncated", "missing", "empty", "corrupt", "sample_rate"), by_length))
    data = (audio / broken["truncated"].path).read_bytes()
    (audio / broken["truncated"].path).write_bytes(data[: len(data) // 3])
    (audio / broken["missing"].path).unlink()
    (audio / broken["empty"].path).write_bytes(b"")
    (audio / broken["corrupt"].path).write_bytes(os.urandom(20000))
    silence = np.zeros((48000 * 5, 2), np.float32)
    soundfile.write(audio / broken["sample_rate"].path, silence, 48000, format="WAV")
    return audio, {kind: track.track_id for kind, track in broken.items()}


def test_bad_files_land_in_the_failures_report_while_the_rest_is_built(synthetic_tree, tmp_path):
    audio, broken = _break_inputs(synthetic_tree, tmp_path)
    options = preparation.BuildOptions(audio, synthetic_tree / "data", tmp_path / "out", workers=2, progress=False)
    summary = preparation.build_dataset(options)

    report = (summary.failures_report).read_text().splitlines()
    reported = {line.split("\t")[0]: line.split("\t")[3] for line in report[1:]}
    assert reported == {track_id: kind for kind, track_id in broken.items()}
    assert summary.failures == {kind: 1 for kind in broken}
    prepared = load_prepared(tmp_path / "out")
    assert set(prepared.failures) == set(broken.values())
    for part in PARTS:
        listed = [track.track_id for track in metadata.read_split(synthetic_tree / "data", 0, part)]
        assert list(prepared.track_ids[part]) == [track_id for track_id in listed if track_id not in reported]
    assert "failed: 5 tracks" in str(summary)

    # The same music at 48 kHz: with --resample it is resampled as the tagger does, and the rebuild takes it in.
    track = next(
        t for t in metadata.read_split(synthetic_tree / "data", 0, "train") if t.track_id == broken["sample_rate"]
    )
    waveform, rate = soundfile.read(synthetic_tree / "audio" / track.path, dtype="float32")
    soundfile.write(
        audio / track.path, librosa.resample(waveform.T, orig_sr=rate, target_sr=48000).T, 48000, format="WAV"
    )
    resampled = preparation.build_dataset(dataclasses.replace(options, resample=True))
    assert resampled.failures == {kind: 1 for kind in broken if kind != "sample_rate"}
    assert broken["sample_rate"] in load_prepared(tmp_path / "out").track_ids["train"]


def test_byte_identical_files_are_reported_and_can_be_dropped(synthetic_tree, prepared_data_dir, tmp_path):
    data_dir, config_name = prepared_data_dir
    report = (layout.dataset_dir(data_dir, config_name, 0) / "duplicates.tsv").read_text().splitlines()
    groups: dict[str, list[list[str]]] = {}
    for line in report[1:]:
        fields = line.split("\t")
        groups.setdefault(fields[0], []).append(fields)
    assert groups and all(len(group) >= 2 for group in groups.values())
    for group in groups.values():
        contents = {(synthetic_tree / "audio" / metadata.audio_path_for(row[2])).read_bytes() for row in group}
        assert len(contents) == 1

    # Reusing the clean build's cache: only stage 2 runs again.
    summary = preparation.build_dataset(
        preparation.BuildOptions(
            synthetic_tree / "audio",
            synthetic_tree / "data",
            tmp_path,
            workers=2,
            progress=False,
            drop_duplicates="keep_one",
            cache_dir=data_dir / "cache" / config_name,
        )
    )
    assert summary.failures == {"duplicate": sum(len(group) - 1 for group in groups.values())}
    kept = load_prepared(tmp_path)
    for group in groups.values():
        ids = {row[2] for row in group}
        assert sum(track_id in kept.track_ids[part] for part in PARTS for track_id in ids) == 1


def test_precomputed_npy_input_builds_the_essentia96_dataset(synthetic_tree, tmp_path):
    arguments = (synthetic_tree / "audio", synthetic_tree / "data", tmp_path / "npy")
    split_paths = {track.path for part in PARTS for track in metadata.read_split(synthetic_tree / "data", 0, part)}
    assert essentia_like.write_essentia_like_tree(*arguments, workers=2, progress=False) == len(split_paths)
    assert essentia_like.write_essentia_like_tree(*arguments, progress=False) == 0  # existing files are kept
    preparation.build_dataset(
        preparation.BuildOptions(
            tmp_path / "npy",
            synthetic_tree / "data",
            tmp_path / "out",
            features="essentia96",
            workers=2,
            progress=False,
        )
    )
    prepared = load_prepared(tmp_path / "out", "essentia96")
    assert prepared.features["n_mels"] == 96 and prepared.chunk_frames == 938
    tracks = _whole_tracks(_examples(prepared, "validation"))
    for track in metadata.read_split(synthetic_tree / "data", 0, "validation"):
        source = np.load(tmp_path / "npy" / features.source_path(track.path, features.settings_for("essentia96")))
        np.testing.assert_array_equal(tracks[track.track_id]["spectrogram"], source.astype(np.float16))


def test_a_cache_made_with_other_settings_is_refused(tmp_path):
    cache = extract.TrackCache(tmp_path)
    cache.claim(features.settings_for("hop512"))
    cache.claim(features.settings_for("hop512"))
    with pytest.raises(ValueError, match="other settings"):
        cache.claim(features.settings_for("hop1536"))
    # A cache whose files hold another layout of the same features is refused alike: its files would be misread.
    other_layout = {**features.settings_for("hop512").to_dict(), "layout": "bins_major"}
    (tmp_path / extract.SETTINGS_NAME).write_text(json.dumps(other_layout))
    with pytest.raises(ValueError, match="in another layout"):
        cache.claim(features.settings_for("hop512"))


def test_journal_of_a_killed_run_keeps_only_finished_tracks(tmp_path):
    cache = extract.TrackCache(tmp_path)
    np.save(cache.feature_path("track_0000001"), np.zeros((4, 3), np.float16))
    cache.append(extract.Outcome("track_0000001", "ok", "01/1.mp3", frames=3, sha256="ab"))
    cache.append(extract.Outcome("track_0000002", "ok", "02/2.mp3", frames=3, sha256="cd"))  # its file is gone
    cache.append(extract.Outcome("track_0000003", "missing", "03/3.mp3", reason="file not found"))
    with cache.journal_path.open("a") as journal:
        journal.write('{"track_id": "track_0000004", "ki')  # killed mid-line
    (tmp_path / ".track_0000005.123.tmp.npy").write_bytes(b"half")

    cache.tidy()
    cache.append(extract.Outcome("track_0000006", "empty", "06/6.mp3", reason="empty file"))

    assert sorted(cache.read_journal()) == ["track_0000001", "track_0000003", "track_0000006"]
    assert not list(tmp_path.glob(".*.tmp.npy"))
