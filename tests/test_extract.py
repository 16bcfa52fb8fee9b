"""Stage 1 of data preparation under attack: killed workers, retiring workers, wrong folders, retries, leftovers.

Every build here is a real one (real MP3s, real processes); none may hang, so each runs under a timeout.
"""

import dataclasses
import functools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import extract, features, layout, metadata, preparation, worker_pool
from data_prep.reader import PARTS, FrameReader, load_prepared

from .conftest import CHUNK_FRAMES

REPO_ROOT = Path(__file__).resolve().parents[1]


def _cli(audio: Path, metadata_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "data_prep.build",
        "--audio_dir",
        str(audio),
        "--metadata_dir",
        str(metadata_dir),
        "--data_dir",
        str(data_dir),
        "--workers",
        "2",
        "--no_progress",
        "--chunk_frames",
        str(CHUNK_FRAMES),
        *extra,
    ]


def _workers(pid: int) -> list[int]:
    """Process ids of the extraction workers among a process's children (spawned, not the resource tracker)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    found = []
    for child in children:
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in command and b"resource_tracker" not in command:
            found.append(child)
    return found


def _same_tracks(data_dir: Path, reference_dir: Path, track_ids: set[str]) -> None:
    """The named tracks hold the same frames and labels in both prepared datasets."""
    got, want = load_prepared(data_dir), load_prepared(reference_dir)
    got_reader, want_reader = FrameReader(got), FrameReader(want)
    for part in PARTS:
        for number, track_id in enumerate(got.track_ids[part]):
            if track_id in track_ids:
                other = want.track_ids[part].index(track_id)
                np.testing.assert_array_equal(got_reader.read(part, number), want_reader.read(part, other))
                np.testing.assert_array_equal(got.parts[part].labels[number], want.parts[part].labels[other])


def test_workers_killed_at_any_moment_never_hang_a_build(synthetic_tree, prepared_data_dir, tmp_path):
    """Workers are SIGKILLed as soon as they start, while they work and between tracks; the build ends, and
    every track is in the shards, identical to a clean build's, or (killed twice) reported as a worker crash."""
    process = subprocess.Popen(
        _cli(synthetic_tree / "audio", synthetic_tree / "data", tmp_path),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    rng = random.Random(0)
    kills, seen, deadline = 0, set(), time.monotonic() + 120
    while process.poll() is None and kills < 6 and time.monotonic() < deadline:
        workers = _workers(process.pid)
        fresh = [pid for pid in workers if pid not in seen]
        seen.update(fresh)
        # The first kill lands at start-up (before a worker has imported anything), the others at random moments
        # of a worker's life: mid-track or between two tracks.
        victim = fresh[0] if fresh and kills == 0 else (rng.choice(workers) if workers and kills else None)
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
            time.sleep(rng.uniform(0.05, 0.6))
        time.sleep(0.002)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert kills >= 3 and "a worker died" in stderr
    prepared = load_prepared(tmp_path)
    stored = {track_id for ids in prepared.track_ids.values() for track_id in ids}
    crashed = {record["track_id"] for record in prepared.failure_records}
    assert all(record["kind"] == "worker_crash" for record in prepared.failure_records)
    everything = {track.track_id for part in PARTS for track in metadata.read_split(synthetic_tree / "data", 0, part)}
    assert stored | crashed == everything and not stored & crashed
    _same_tracks(tmp_path, prepared_data_dir[0], stored)


def test_a_build_with_more_tracks_per_worker_than_their_limit_finishes(synthetic_tree, prepared_data_dir, tmp_path):
    """Each of 2 workers retires after 2 tracks, some 6 times over; the shards equal a clean build's."""
    preparation.build_dataset(
        preparation.BuildOptions(
            synthetic_tree / "audio",
            synthetic_tree / "data",
            tmp_path,
            workers=2,
            progress=False,
            chunk_frames=CHUNK_FRAMES,
            tracks_per_worker=2,
        )
    )
    everything = {track_id for ids in load_prepared(prepared_data_dir[0]).track_ids.values() for track_id in ids}
    assert len(everything) > 4 * 2 * 2
    _same_tracks(tmp_path, prepared_data_dir[0], everything)


def test_a_wrong_audio_dir_fails_in_one_line_and_the_right_one_then_builds(synthetic_tree, tmp_path):
    wrong = subprocess.run(
        _cli(tmp_path / "no_such_folder", synthetic_tree / "data", tmp_path / "data"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert wrong.returncode == 1
    lines = wrong.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: none of the") and "missing" in lines[0]
    assert "check --audio_dir" in lines[0] and "Traceback" not in wrong.stderr
    right = subprocess.run(
        _cli(synthetic_tree / "audio", synthetic_tree / "data", tmp_path / "data"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert right.returncode == 0, right.stderr
    assert load_prepared(tmp_path / "data").failures == {}


def _copy_audio(tree: Path, tmp_path: Path) -> Path:
    audio = tmp_path / "audio"
    shutil.copytree(tree / "audio", audio)
    return audio


def test_a_missing_file_is_looked_for_again_and_retry_failed_mends_a_finished_dataset(synthetic_tree, tmp_path):
    audio = _copy_audio(synthetic_tree, tmp_path)
    train = metadata.read_split(synthetic_tree / "data", 0, "train")
    missing, corrupt = train[0], train[1]
    (audio / missing.path).rename(tmp_path / "put_aside.mp3")
    original = (audio / corrupt.path).read_bytes()
    (audio / corrupt.path).write_bytes(b"\0" * 4000)
    options = preparation.BuildOptions(
        audio, synthetic_tree / "data", tmp_path / "data", workers=2, progress=False, chunk_frames=CHUNK_FRAMES
    )
    first = preparation.build_dataset(options)
    assert first.failures == {"missing": 1, "corrupt": 1}

    (tmp_path / "put_aside.mp3").rename(audio / missing.path)  # found again on the next run, without asking
    (audio / corrupt.path).write_bytes(original)  # mended, but only looked at with retry_failed
    second = preparation.build_dataset(options)
    assert second.failures == {"corrupt": 1}
    assert missing.track_id in load_prepared(tmp_path / "data").track_ids["train"]

    third = preparation.build_dataset(dataclasses.replace(options, retry_failed=True))
    assert third.failures == {}
    assert corrupt.track_id in load_prepared(tmp_path / "data").track_ids["train"]


def test_a_stale_incomplete_folder_of_a_killed_write_is_removed(synthetic_tree, prepared_data_dir, tmp_path):
    data_dir, config_name = prepared_data_dir
    cache = tmp_path / "cache"
    shutil.copytree(data_dir / "cache" / config_name, cache)
    stale = layout.dataset_dir(tmp_path, config_name, 0).parent / f"incomplete.AB12CD_{layout.VERSION}"
    (stale / "junk").mkdir(parents=True)  # as a build killed while TFDS wrote its shards leaves it
    preparation.build_dataset(
        preparation.BuildOptions(
            synthetic_tree / "audio",
            synthetic_tree / "data",
            tmp_path,
            workers=2,
            progress=False,
            chunk_frames=CHUNK_FRAMES,
            cache_dir=cache,
        )
    )
    assert not list(stale.parent.glob("incomplete.*"))
    assert layout.is_prepared(tmp_path, config_name, 0)


def test_the_schedule_keeps_memory_under_its_budget_and_runs_a_larger_track_alone():
    durations = [3900.0, 2000.0, 600.0, 300.0, 250.0, 200.0, 200.0, 30.0]
    jobs = [extract.TrackJob(f"track_{n}", f"{n}.mp3", duration) for n, duration in enumerate(durations)]
    memory = functools.partial(extract.track_memory, settings=features.settings_for("hop512"))
    budget = memory(jobs[4]) + memory(jobs[5])
    schedule = worker_pool._Schedule(jobs, budget, memory)
    running, order, peak = [], [], 0
    while len(schedule) or running:
        while (job := schedule.take()) is not None:
            running.append(job)
            order.append(job.duration)
        peak = max(peak, schedule.in_flight)
        assert schedule.in_flight <= budget or len(running) == 1
        schedule.finished(running.pop(0))
    assert sorted(order) == sorted(durations)
    assert order[0] == 3900.0  # the longest first, alone: it is larger than the budget
    assert peak == memory(jobs[0])


def test_without_a_budget_the_schedule_starts_the_longest_tracks_first():
    durations = [30.0, 3900.0, 250.0, 600.0]
    schedule = worker_pool._Schedule([extract.TrackJob(f"t{d}", "", d) for d in durations], sys.maxsize)
    assert [schedule.take().duration for _ in durations] == sorted(durations, reverse=True)


def test_a_tracks_memory_estimate_is_what_its_worker_buffers_up_to_the_cap():
    """The values buffered until the track's peak is known: every signal's float32 power spectra (1,025 bins at
    86.13 frames per second), at most `features.PEAK_BUFFER_BYTES` however long the track."""
    mono, stereo = features.settings_for("hop512"), features.settings_for("hop512_stereo")

    def buffered(seconds: float, settings: features.FeatureSettings) -> int:
        return extract.track_memory(extract.TrackJob("t", "t.mp3", seconds), settings) - extract.TRACK_BYTES_FIXED

    assert buffered(240.0, mono) == int(4 * 1025 * 44100 / 512 * 240.0)
    assert buffered(240.0, stereo) == pytest.approx(2 * buffered(240.0, mono), abs=1)
    assert buffered(3 * 3600.0, mono) == buffered(3 * 3600.0, stereo) == features.PEAK_BUFFER_BYTES
    assert buffered(210.0, features.settings_for("essentia96")) < 10 * 2**20  # 96 mels of an .npy, read whole


@pytest.mark.parametrize("value", [0, -1])
def test_a_nonsense_budget_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="must be positive"):
        extract.extract_all(
            [],
            tmp_path,
            extract.TrackCache(tmp_path),
            extract.features_lib.FeatureSettings(),
            1,
            memory_budget_gb=value,
        )


@pytest.mark.parametrize("bad_value", [65520.0, -np.inf, np.nan])
def test_a_cache_file_is_written_only_when_every_value_fits_float16(tmp_path, bad_value):
    """Blocks (n_mels, frames) become one time-major float16 file, as `np.save` writes it; a value that float16
    rounds to infinity (65,520 and beyond) or that is not a number, in any block, leaves no file."""
    rng = np.random.default_rng(0)
    blocks = [rng.normal(0, 100, (8, frames)).astype(np.float32) for frames in (5, 3, 7)]
    blocks[1][2, 1] = 65519.0  # the largest magnitude float16 rounds to a finite value (65,504)
    target = tmp_path / "track.npy"
    assert extract._write_features(target, (15, 8), iter(blocks))
    assert np.load(target).dtype == np.float16
    np.testing.assert_array_equal(np.load(target), np.concatenate(blocks, axis=1).T.astype(np.float16))
    blocks[2][4, 6] = bad_value
    assert not extract._write_features(tmp_path / "bad.npy", (15, 8), iter(blocks))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["track.npy"]
