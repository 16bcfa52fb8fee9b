"""Data preparation under faults and mistakes: hung reads, bad input files, a full disk, damaged shards, wrong
folders. Every build here is a real one (real MP3s, real processes, real signals and file-size limits), run as a
subprocess under a timeout wherever the code under test could hang.
"""

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_masked_crc32c

from data_prep import (
    essentia_like,
    extract,
    layout,
    metadata,
    preparation,
    reader,
    shard_writer,
    synthetic,
    worker_pool,
)
from data_prep import features as features_lib
from data_prep.reader import PARTS, load_prepared, time_major
from emorf_jax import input_pipeline
from tests.process_output import stderr_excerpt

from . import file_size_limit, unprivileged
from .test_build import _shard_bytes
from .test_extract import _cli

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(command: list[str], limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    """Runs a command; with `limit_bytes`, no file it (or a process it starts) writes may grow past that size."""
    if limit_bytes:
        command = file_size_limit.command(command, limit_bytes)
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def _failures(data_dir: Path) -> dict[str, tuple[str, str]]:
    """failures.tsv as track id -> (kind, reason)."""
    lines = (layout.dataset_dir(data_dir, "hop512", 0) / "failures.tsv").read_text().splitlines()
    return {fields[0]: (fields[3], fields[4]) for fields in (line.split("\t") for line in lines[1:])}


# ---------------------------------------------------------------- bad input, a hung read


def _spoil(audio: Path, tree: Path) -> dict[str, metadata.Track]:
    """Replaces training tracks' files with bad input, one kind each; the other tracks stay whole."""
    train = sorted(metadata.read_split(tree / "data", 0, "train"), key=lambda track: -track.duration)
    bad = dict(zip(("truncated", "random", "garbage_frames", "empty", "one_sample", "directory", "nan", "fifo"), train))
    rng = np.random.default_rng(0)
    path = {kind: audio / track.path for kind, track in bad.items()}
    whole = path["truncated"].read_bytes()
    path["truncated"].write_bytes(whole[: len(whole) // 3])  # much less audio than the TSV says
    path["random"].write_bytes(rng.bytes(20000))
    # A real MP3's first frames (its header and a little audio), then garbage where the other frames were.
    path["garbage_frames"].write_bytes(path["garbage_frames"].read_bytes()[:1500] + rng.bytes(60000))
    path["empty"].write_bytes(b"")
    path["one_sample"].unlink()
    soundfile.write(path["one_sample"], np.zeros((1, 2), np.float32), 44100, format="WAV")
    path["directory"].unlink()
    path["directory"].mkdir()  # a folder named like the audio file
    samples = np.zeros((44100 * 5, 2), np.float32)
    samples[1000, 0] = np.nan
    path["nan"].unlink()
    soundfile.write(path["nan"], samples, 44100, format="WAV", subtype="FLOAT")
    path["fifo"].unlink()
    os.mkfifo(path["fifo"])  # opening it for reading blocks for ever: a hung read, as from a stalled filesystem
    return bad


def test_bad_input_files_and_a_hung_read_each_get_a_failure_row_and_the_build_goes_on(synthetic_tree, tmp_path):
    audio = tmp_path / "audio"
    shutil.copytree(synthetic_tree / "audio", audio)
    bad = _spoil(audio, synthetic_tree)
    deadline = ["--deadline_floor_s", "15", "--deadline_s_per_audio_s", "1"]
    result = _run(_cli(audio, synthetic_tree / "data", tmp_path / "out", *deadline))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    failures = _failures(tmp_path / "out")
    assert set(failures) == {track.track_id for track in bad.values()}
    kinds = {kind: failures[track.track_id][0] for kind, track in bad.items()}
    assert kinds == {
        "truncated": "truncated",
        "random": "corrupt",
        "garbage_frames": "truncated",  # its first frames decode
        "empty": "empty",
        "one_sample": "too_short",
        "directory": "unreadable",
        "nan": "non_finite",
        "fifo": "timeout",
    }
    reasons = {kind: failures[track.track_id][1] for kind, track in bad.items()}
    assert reasons["garbage_frames"].startswith("decoded 0.0 s of the TSV's")
    assert "decoded" in reasons["truncated"] and "of the TSV's" in reasons["truncated"]
    assert "Is a directory" in reasons["directory"]
    assert "non-finite samples" in reasons["nan"]
    fifo_deadline = 15 + bad["fifo"].duration
    assert f"no result within {fifo_deadline:.0f} s" in reasons["fifo"] and "--retry_failed" in reasons["fifo"]
    prepared = load_prepared(tmp_path / "out")
    whole = {track.track_id for part in PARTS for track in metadata.read_split(synthetic_tree / "data", 0, part)}
    assert set().union(*prepared.track_ids.values()) == whole - set(failures)


# One track's extraction, its outcome printed as JSON: argv is the audio and cache folders, then the track.
_EXTRACT_ONE = """
import json, sys
from data_prep import extract
audio_dir, cache_dir, track_id, path, duration = sys.argv[1:]
job = extract.TrackJob(track_id, path, float(duration))
outcome = extract.extract_track(job, audio_dir, cache_dir, extract.features_lib.settings_for("hop512"))
print(json.dumps({"kind": outcome.kind, "reason": outcome.reason}))
"""


def test_a_file_that_cannot_be_opened_is_reported_as_unreadable(synthetic_tree, tmp_path):
    """In a child process that respects file permissions even as root (tests/unprivileged.py), so that the case
    runs in CI too."""
    track = metadata.read_split(synthetic_tree / "data", 0, "train")[0]
    source = tmp_path / track.path
    source.parent.mkdir(parents=True)
    shutil.copyfile(synthetic_tree / "audio" / track.path, source)
    source.chmod(0)
    job = [str(tmp_path), str(tmp_path), track.track_id, track.path, str(track.duration)]
    result = subprocess.run(
        unprivileged.command([sys.executable, "-c", _EXTRACT_ONE, *job]),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, stderr_excerpt(result.stderr)
    outcome = json.loads(result.stdout)
    assert outcome["kind"] == "unreadable", outcome
    assert outcome["reason"].startswith(f"cannot read {source}: ") and "Permission denied" in outcome["reason"]


# ---------------------------------------------------------------- the shared worker pool


def test_a_failing_track_does_not_stop_the_synthetic_or_essentia_like_files_of_the_others(tmp_path):
    synthetic.make_synthetic(tmp_path / "tree", num_tracks=10, seed=1, duration=2.0, duplicate_groups=0, workers=2)
    tracks = [t for part in PARTS for t in metadata.read_split(tmp_path / "tree" / "data", 0, part)]
    broken = tracks[0]
    (tmp_path / "tree" / "audio" / broken.path).write_bytes(b"not audio")
    arguments = (tmp_path / "tree" / "audio", tmp_path / "tree" / "data", tmp_path / "npy")
    with pytest.raises(worker_pool.JobsFailed, match=rf"1 of {len(tracks)} tracks failed .*{broken.track_id}: error"):
        essentia_like.write_essentia_like_tree(*arguments, workers=2, progress=False)
    written = {path.relative_to(tmp_path / "npy").with_suffix(".mp3").as_posix() for path in tmp_path.glob("npy/*/*")}
    assert written == {track.path for track in tracks} - {broken.path}

    # Rendering: a track whose folder cannot be made (a file stands in its place) fails; the others are written.
    plans = synthetic.plan_tracks(10, seed=2, duration=2.0)
    audio = tmp_path / "rendered"
    (audio / Path(plans[0].path).parent).parent.mkdir(parents=True)
    (audio / Path(plans[0].path).parent).write_bytes(b"")
    blocked = {plan.track_id for plan in plans if Path(plan.path).parent == Path(plans[0].path).parent}
    with pytest.raises(worker_pool.JobsFailed, match=f"{len(blocked)} of 10 tracks failed"):
        synthetic._write_audio(plans, 2, audio, workers=2)
    assert {plan.track_id for plan in plans if (audio / plan.path).is_file()} == {p.track_id for p in plans} - blocked


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_ends_the_build_in_one_line_and_a_rerun_gives_the_clean_shards(
    synthetic_tree, prepared_data_dir, tmp_path
):
    command = _cli(synthetic_tree / "audio", synthetic_tree / "data", tmp_path)
    cache = extract.TrackCache(tmp_path / "cache" / "hop512")

    # Stage 1: the features of most tracks (float16, 256 x 86 per second: 44 KB/s) do not fit under 120 KB.
    stage1 = _run(command, limit_bytes=120_000)
    assert stage1.returncode == 1 and "Traceback" not in stage1.stderr, stage1.stderr
    line = stage1.stderr.strip().splitlines()[-1]
    assert line.startswith("error: out of disk space: cannot write ") and "File too large" in line
    assert line.endswith("free space and run the same command again")
    assert not list(cache.root.glob(".*.tmp.npy"))  # no half-written feature file
    assert all(outcome.ok for outcome in cache.read_journal().values())  # the full disk is no track's failure

    # Stage 2: every feature file fits, the shards (a few MB) do not.
    stage2 = _run(command, limit_bytes=3_000_000)
    assert stage2.returncode == 1 and "Traceback" not in stage2.stderr, stage2.stderr
    line = stage2.stderr.strip().splitlines()[-1]
    assert line.startswith("error: out of disk space: ") and "File too large" in line
    journal = cache.journal_path.read_text()
    total = sum(len(metadata.read_split(synthetic_tree / "data", 0, part)) for part in PARTS)
    assert len(cache.read_journal()) == total and all(outcome.ok for outcome in cache.read_journal().values())
    assert not layout.is_prepared(tmp_path, "hop512", 0)

    rerun = _run(command)
    assert rerun.returncode == 0, rerun.stderr
    assert cache.journal_path.read_text() == journal  # stage 1 was intact: nothing extracted again
    assert _shard_bytes(tmp_path, "hop512") == _shard_bytes(*prepared_data_dir)


# ---------------------------------------------------------------- wrong folders


@pytest.mark.parametrize("wrong", ["root", "splits"])
def test_a_metadata_dir_one_level_off_is_named_in_one_line(synthetic_tree, tmp_path, wrong):
    given = synthetic_tree if wrong == "root" else synthetic_tree / "data" / "splits"
    options = preparation.BuildOptions(synthetic_tree / "audio", given, tmp_path, progress=False)
    with pytest.raises(preparation.BuildError) as error:
        preparation.build_dataset(options)
    assert str(error.value) == (
        f"{given} holds no {metadata.TAG_LIST_NAME} and splits/split-0/*.tsv; give --metadata_dir "
        f"{synthetic_tree / 'data'} instead, which has them"
    )
    assert not (tmp_path / "cache").exists()
    if wrong == "root":  # the command says it in one line
        result = _run(_cli(synthetic_tree / "audio", given, tmp_path))
        assert result.returncode == 1 and result.stderr.strip() == f"error: {error.value}"


# ---------------------------------------------------------------- damaged shards


def _copy_dataset(prepared_data_dir, tmp_path: Path) -> Path:
    """A copy of the shared prepared dataset (its shards only, not its cache): the tests damage it."""
    data_dir, config_name = prepared_data_dir
    source = layout.dataset_dir(data_dir, config_name, 0)
    shutil.copytree(source, layout.dataset_dir(tmp_path, config_name, 0))
    return tmp_path


def test_masked_crc32c_is_tfrecords():
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 8, 9, 100, 4099):
        data = rng.bytes(size)
        assert reader.masked_crc32c(data) == reference_masked_crc32c(data)


def test_verify_names_a_flipped_byte_and_a_truncated_shard_by_file_and_offset(prepared_data_dir, tmp_path):
    data_dir = _copy_dataset(prepared_data_dir, tmp_path)
    command = [sys.executable, "-m", "data_prep.verify", "--data_dir", str(data_dir)]
    clean = _run(command)
    assert clean.returncode == 0 and clean.stdout.startswith("ok: "), clean.stdout + clean.stderr

    prepared = load_prepared(data_dir)
    train, validation = prepared.parts["train"], prepared.parts["validation"]
    flipped_shard = train.shard_paths[train.chunk_shard[5]]
    bounds, _ = reader.scan_records(flipped_shard)
    flipped_record = int(bounds[np.searchsorted(bounds, train.chunk_offset[5], side="right") - 1])
    with flipped_shard.open("r+b") as shard:
        shard.seek(int(train.chunk_offset[5]) + 100)
        byte = shard.read(1)
        shard.seek(-1, os.SEEK_CUR)
        shard.write(bytes([byte[0] ^ 0x10]))
    truncated_shard = validation.shard_paths[-1]
    bounds, _ = reader.scan_records(truncated_shard)
    os.truncate(truncated_shard, int(bounds[-1]) - 10)

    damaged = _run(command)
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    assert (
        f"{flipped_shard}: record at byte {flipped_record}: the checksum of its data does not match" in damaged.stdout
    )
    assert f"{truncated_shard}: record at byte {int(bounds[-2])}: truncated" in damaged.stdout
    assert "datasets damaged" in damaged.stderr and "Traceback" not in damaged.stderr

    nothing = _run([sys.executable, "-m", "data_prep.verify", "--data_dir", str(tmp_path / "nowhere")])
    assert nothing.returncode == 2 and "no prepared dataset" in nothing.stderr


def test_verify_checks_the_index_and_the_statistics(prepared_data_dir, tmp_path):
    data_dir = _copy_dataset(prepared_data_dir, tmp_path)
    directory = layout.dataset_dir(data_dir, "hop512", 0)
    assert reader.dataset_problems(data_dir, "hop512", 0) == []
    stored = json.loads((directory / "metadata.json").read_text())
    stored["std"][3] = float("nan")
    stored["num_train_frames"] += 1
    (directory / "metadata.json").write_text(json.dumps(stored))
    with np.load(directory / layout.RECORD_INDEX_NAME) as index:
        arrays = dict(index)
    arrays["test/chunk_offset"][2] += 10**5
    np.savez(directory / layout.RECORD_INDEX_NAME, **arrays)

    problems = reader.dataset_problems(data_dir, "hop512", 0)
    test_shard = load_prepared(data_dir).parts["test"].shard_paths[arrays["test/chunk_shard"][2]]
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{test_shard}: record at byte ") and "chunk 2's spectrogram" in problems[0]
    assert problems[1].endswith("metadata.json: std is not finite in 1 of 256 bins")
    assert "num_train_frames" in problems[2]


def test_training_reads_that_verify_checksums_stop_at_a_damaged_record(prepared_data_dir, tmp_path):
    data_dir = _copy_dataset(prepared_data_dir, tmp_path)
    prepared = load_prepared(data_dir)
    plain, verifying = reader.FrameReader(prepared), reader.FrameReader(prepared, verify_checksums=True)
    for track in range(len(prepared.parts["train"])):
        np.testing.assert_array_equal(verifying.read("train", track), plain.read("train", track))

    train = prepared.parts["train"]
    shard = train.shard_paths[train.chunk_shard[0]]
    with shard.open("r+b") as file:  # the first chunk's first value becomes NaN (float16 0x7E00)
        file.seek(int(train.chunk_offset[0]))
        file.write(b"\x00\x7e")
    assert np.isnan(reader.FrameReader(prepared).read("train", 0)[0, 0])  # unverified reads give garbage
    message = (
        rf"{re.escape(str(shard))}: record at byte 0: the checksum of its data does not match; .*data_prep\.verify"
    )
    with pytest.raises(reader.DamagedRecord, match=message):
        reader.FrameReader(prepared, verify_checksums=True).read("train", 0, 0, 10)
    # Crops longer than every track read whole tracks (looped): the epoch reaches the damaged chunk.
    batches = input_pipeline.train_batches(
        prepared,
        global_batch_size=2,
        crop_frames=int(train.frames.max()) + 1,
        max_time_shift=0,
        seed=0,
        verify_checksums=True,
    )
    with pytest.raises(reader.DamagedRecord, match=message):
        for _ in range(len(train)):
            next(batches)


# ---------------------------------------------------------------- a track of any length in bounded memory


def test_a_track_decoded_in_small_blocks_and_twice_is_cached_as_its_whole_decode_gives(
    synthetic_tree, tmp_path, monkeypatch
):
    """What a three-hour file meets, at the size of a test: the longest synthetic MP3 decoded 10,000 samples at a
    time, its power spectra larger than the buffer (decoded a second time once its peak is known), and its cache file
    written a block of frames at a time (about 20 at this block size). The file is what `np.save` writes, and its
    features are the whole decode's, time-major (within the float16 they are stored in)."""
    monkeypatch.setattr(features_lib, "DECODE_BLOCK_FRAMES", 10_000)
    monkeypatch.setattr(features_lib, "PEAK_BUFFER_BYTES", 100_000)
    track = max(metadata.read_split(synthetic_tree / "data", 0, "train"), key=lambda track: track.duration)
    settings = features_lib.settings_for("hop512")
    job = extract.TrackJob(track.track_id, track.path, track.duration)
    outcome = extract.extract_track(job, synthetic_tree / "audio", tmp_path, settings)
    assert outcome.ok, outcome.reason
    cached_file = tmp_path / f"{track.track_id}.npy"
    cached = np.load(cached_file)
    saved = io.BytesIO()
    np.save(saved, cached)
    assert cached_file.read_bytes() == saved.getvalue()
    data = (synthetic_tree / "audio" / track.path).read_bytes()
    whole = features_lib.audio_features(data, track.path, settings)
    assert outcome.frames == cached.shape[0] == whole.shape[1] > 10 * 100
    assert outcome.sha256 == hashlib.sha256(data).hexdigest()
    np.testing.assert_allclose(cached, time_major(whole.astype(np.float16)), rtol=1e-3, atol=1e-3)
    assert list(tmp_path.iterdir()) == [cached_file]  # no temporary file left


def test_the_normalisation_statistics_are_accumulated_in_blocks_as_over_whole_tracks(tmp_path):
    """A track's cached features are read back `block_frames` at a time (the statistics pass holds one block in
    float64, not the track), and the per-bin mean and std over blocks of tracks of any length equal the whole
    frames' in float64."""
    cache = extract.TrackCache(tmp_path)
    rng = np.random.default_rng(0)
    tracks = {"a": 1000, "b": 5, "c": 333, "d": 64}
    values = {}
    for track_id, frames in tracks.items():
        values[track_id] = (rng.normal(-30, 15, (frames, 8)) + rng.normal(0, 10, (1, 8))).astype(np.float16)
        np.save(cache.feature_path(track_id), values[track_id])
    blocks = {track_id: list(cache.frame_blocks(track_id, 64)) for track_id in tracks}
    for track_id, frames in tracks.items():
        assert [block.shape[0] for block in blocks[track_id]] == [64] * (frames // 64) + [frames % 64] * (
            frames % 64 > 0
        )
        np.testing.assert_array_equal(np.concatenate(blocks[track_id]), values[track_id])
    mean, std, count = shard_writer.frame_statistics(block for track_id in tracks for block in blocks[track_id])
    every_frame = np.concatenate(list(values.values())).astype(np.float64)
    assert count == sum(tracks.values())
    np.testing.assert_allclose(mean, every_frame.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, every_frame.std(axis=0), rtol=1e-12)
