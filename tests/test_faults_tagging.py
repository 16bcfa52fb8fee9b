"""Faults and mistakes met by tagging, evaluation and ensembles (docs/faults.md): a full disk under `predict`'s
outputs, bad audio files, a reader of standard output that stops reading, decoder warnings and short decodes named
by file, unreadable thresholds, a run's folder given as a checkpoint, and metric warnings that name their tags."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile

from data_prep import features, metadata
from emorf_jax import evaluate, report, split_predictions, tagger, thresholds, track_features, windowing
from emorf_jax.predict import __main__ as predict_command
from tests import file_size_limit, unprivileged

REPO = Path(__file__).resolve().parents[1]
PREDICT = [sys.executable, "-m", "emorf_jax.predict", "--no_progress"]


@pytest.fixture(scope="module")
def clips(synthetic_tree, tmp_path_factory) -> list[str]:
    """Four real MP3s of the synthetic dataset in one folder, in the order `predict` tags them."""
    folder = tmp_path_factory.mktemp("clips")
    for track in metadata.read_split(synthetic_tree / "data", 0, "train")[:4]:
        shutil.copy(synthetic_tree / "audio" / track.path, folder / Path(track.path).name)
    return sorted(str(path) for path in folder.iterdir())


# The files of a run with --taggram --embeddings, in the order a tagged file's rows are written (side rows first).
WRITE_ORDER = ("taggram.csv", "taggram_embeddings.npy", "embeddings.npy", "output")


def _sizes_after_each_file(
    folder: Path, stem: str, suffix: str, files: list[str], taggram: bool
) -> dict[str, list[int]]:
    """Per file of a finished run, its size after each tagged file's rows: what a file size limit is met at."""
    sizes = {}
    for side in ("taggram.csv", "output") if taggram else ("output",):
        path = folder / (f"{stem}{suffix}" if side == "output" else f"{stem}.{side}")
        data = path.read_bytes()
        lines = data.splitlines(keepends=True)
        header = 0 if path.suffix == ".jsonl" else 1
        owners = [
            json.loads(line)["path"] if path.suffix == ".jsonl" else next(csv.reader([line.decode()]))[0]
            for line in lines[header:]
        ]
        ends = np.cumsum([len(line) for line in lines])
        if side == "taggram.csv":
            taggram_owners = owners
        sizes[side] = [int(ends[header + max(k for k, owner in enumerate(owners) if owner == f)]) for f in files]
    rows = {"embeddings.npy": np.arange(1, len(files) + 1)}
    if taggram:  # the taggram's rows per tagged file
        rows["taggram_embeddings.npy"] = np.cumsum([sum(row == f for row in taggram_owners) for f in files])
    for side, count in rows.items():
        path = folder / f"{stem}.{side}"
        with path.open("rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            header_bytes = f.tell()
        row_bytes = (path.stat().st_size - header_bytes) // count[-1]
        sizes[side] = [int(header_bytes + rows_so_far * row_bytes) for rows_so_far in count]
    return sizes


@pytest.mark.parametrize("suffix,target", [(".csv", "output"), (".jsonl", "taggram.csv")])
def test_a_full_disk_ends_predict_with_one_line_and_the_same_command_completes_the_output(
    clips, random_checkpoints, tmp_path, suffix, target
):
    taggram = target == "taggram.csv"
    flags = [*clips, f"--checkpoint={random_checkpoints[0]}", "--embeddings", "--no_progress"]
    flags += ["--taggram"] if taggram else []
    assert predict_command.main([*flags, f"--output={tmp_path / 'reference'}{suffix}", "--workers=0"]) == 0
    sizes = _sizes_after_each_file(tmp_path, "reference", suffix, clips, taggram)
    expected = {
        side: (tmp_path / (f"reference{suffix}" if side == "output" else f"reference.{side}")).read_bytes()
        for side in sizes
    }
    # A limit halfway through the target's rows of the third file; the first file to cross it, in the order of the
    # writes, is the one the error names, and the files before the one it crosses at are kept.
    limit = (sizes[target][1] + sizes[target][2]) // 2
    kept, named = min(
        (next(i for i, size in enumerate(sizes[side] + [np.inf]) if size > limit), WRITE_ORDER.index(side), side)
        for side in sizes
    )[::2]
    output = tmp_path / f"tags{suffix}"
    named_path = output if named == "output" else tmp_path / f"tags.{named}"
    command = [*PREDICT, *flags, f"--output={output}", "--workers=1"]
    full = subprocess.run(
        file_size_limit.command(command, limit), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 1, full.stderr
    assert "Traceback" not in full.stderr
    assert 0 < kept < len(clips)
    assert [line for line in full.stderr.splitlines() if "error:" in line] == [
        f"python -m emorf_jax.predict: error: cannot write {named_path}: File too large; free space and run the "
        f"same command again: it keeps the {kept} files written and tags the other {len(clips) - kept}"
    ]
    # The rows written before are intact: the output's complete lines are the reference's first ones.
    written = output.read_bytes()
    complete = written[: written.rfind(b"\n") + 1]
    assert expected["output"].startswith(complete) and complete.count(b"\n") == kept + (suffix == ".csv")
    # The same command, with space, resumes and ends with exactly what a run without the fault writes.
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"holds {kept} of these files: tagging the other {len(clips) - kept}" in rerun.stderr
    for side in sizes:
        assert (output if side == "output" else tmp_path / f"tags.{side}").read_bytes() == expected[side], side


def test_a_full_disk_under_a_json_output_leaves_no_half_document(clips, random_checkpoints, tmp_path):
    output = tmp_path / "tags.json"
    command = [*PREDICT, *clips[:2], f"--checkpoint={random_checkpoints[0]}", f"--output={output}", "--workers=0"]
    full = subprocess.run(file_size_limit.command(command, 100), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    assert full.stderr.strip().splitlines()[-1] == (
        f"python -m emorf_jax.predict: error: cannot write {output}: File too large; free space and run the same "
        "command again"
    )
    assert list(tmp_path.iterdir()) == []


def _wav(path: Path, samples: np.ndarray, rate: int, subtype: str) -> str:
    soundfile.write(path, samples, rate, subtype=subtype)
    return str(path)


def test_bad_files_each_get_their_row_and_a_truncated_mp3_is_tagged_with_a_warning(clips, random_checkpoints, tmp_path):
    """Random bytes named .mp3, an MP3 header followed by garbage, NaN and infinite samples, an empty file, one
    sample, a folder named like audio (searched, not tagged), ten minutes of silence, an MP3 cut in half (tagged,
    with both durations named), and a file its permissions deny (chmod 000; the command runs without root's power to
    read it, tests/unprivileged.py, so that the case runs in CI too)."""
    folder = tmp_path / "music"
    folder.mkdir()
    rng = np.random.default_rng(0)
    mp3 = Path(clips[0]).read_bytes()
    (folder / "random.mp3").write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    (folder / "garbage.mp3").write_bytes(mp3[:2000] + rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes())
    (folder / "truncated.mp3").write_bytes(mp3[: len(mp3) // 2])
    (folder / "empty.mp3").write_bytes(b"")
    (folder / "x.mp3").mkdir()
    noise = 0.1 * rng.standard_normal(44100).astype(np.float32)
    bad = {"nan.wav": np.nan, "inf.wav": np.inf}
    for name, value in bad.items():
        _wav(folder / name, np.where(np.arange(noise.size) == 500, value, noise).astype(np.float32), 44100, "FLOAT")
    _wav(folder / "one_sample.wav", noise[:1], 44100, "FLOAT")
    _wav(folder / "silence.wav", np.zeros(600 * 8000, np.int16), 8000, "PCM_16")  # 10 minutes, 9.6 MB
    (folder / "locked.mp3").write_bytes(mp3)
    (folder / "locked.mp3").chmod(0)
    failing = {"random.mp3", "garbage.mp3", "empty.mp3", "one_sample.wav", "locked.mp3", *bad}
    output = tmp_path / "rows.csv"
    result = subprocess.run(
        unprivileged.command(
            [*PREDICT, str(folder), f"--checkpoint={random_checkpoints[0]}", f"--output={output}", "--workers=1"]
        ),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    with output.open(newline="") as f:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(f)}
    assert set(rows) == failing | {"truncated.mp3", "silence.wav"}  # the folder x.mp3 is not a file to tag
    assert {name for name, row in rows.items() if row["error"]} == failing
    assert "empty file" in rows["empty.mp3"]["error"] and "non-finite samples" in rows["nan.wav"]["error"]
    assert "cannot decode" in rows["random.mp3"]["error"] and "need more than" in rows["one_sample.wav"]["error"]
    assert "Permission denied" in rows["locked.mp3"]["error"]
    for name in failing:
        assert any(str(folder / name) in line for line in result.stderr.splitlines()), name
    whole = soundfile.info(clips[0]).frames / soundfile.info(clips[0]).samplerate
    warning = f"warning: {folder / 'truncated.mp3'}: decoded {{:.1f}} s of audio, its header says {whole:.1f} s"
    assert any(warning.format(whole / 2 + tenths / 10) in result.stderr for tenths in range(-3, 4)), result.stderr
    # libmpg123's own warnings name their file: no line of standard error is left without one.
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert any("Xing stream size off" in line for line in lines)
    assert all(str(folder) in line for line in lines), lines


def test_decoder_messages_and_a_short_decode_name_their_file(clips, capfd):
    data = Path(clips[0]).read_bytes()
    waveform, rate = features.decode_audio(data[: len(data) // 2], "music/cut.mp3")
    whole, _ = features.decode_audio(data, "music/whole.mp3")
    lines = capfd.readouterr().err.splitlines()
    assert lines and all(line.startswith(("music/cut.mp3: ", "warning: music/cut.mp3: ")) for line in lines), lines
    assert lines[-1] == (
        f"warning: music/cut.mp3: decoded {len(waveform) / rate:.1f} s of audio, its header says "
        f"{len(whole) / rate:.1f} s (a truncated or damaged file?); using the {len(waveform) / rate:.1f} s decoded"
    )
    assert features.short_decode_warning("a.mp3", 95, 100, 1) is None  # an estimated header count: within 10 %


def _with_stdout_closed(*arguments: str) -> subprocess.CompletedProcess:
    """`predict` whose reader has gone before it prints anything: `| head -1` after the first line, without the race
    of a shell pipeline (whose reader may still be there when a short output is written)."""
    process = subprocess.Popen(
        [*PREDICT, *arguments], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()
    stderr = process.stderr.read()
    return subprocess.CompletedProcess(process.args, process.wait(timeout=300), None, stderr)


def test_a_reader_that_stops_reading_ends_predict_quietly_and_a_full_standard_output_in_one_line(
    clips, random_checkpoints
):
    describe = _with_stdout_closed(f"--describe={random_checkpoints[0]}")
    tags = _with_stdout_closed(*clips[:2], f"--checkpoint={random_checkpoints[0]}", "--workers=0")
    for result in (describe, tags):
        assert result.returncode == 0 and result.stderr == "", result.stderr
    if not Path("/dev/full").exists():  # a device whose every write fails with ENOSPC
        return
    with open("/dev/full", "w") as full_disk:
        full = subprocess.run(
            [*PREDICT, f"--describe={random_checkpoints[0]}"],
            cwd=REPO,
            stdout=full_disk,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    assert full.returncode == 1 and full.stderr == (
        "python -m emorf_jax.predict: error: cannot write standard output: No space left on device; free space and "
        "run the same command again\n"
    )


def test_mistaken_thresholds_and_checkpoint_paths_get_one_line_saying_what_to_do(
    clips, random_checkpoints, tmp_path, capsys
):
    not_text = tmp_path / "thresholds.tsv"
    not_text.write_bytes(bytes(range(128, 256)))
    checkpoint = f"--checkpoint={random_checkpoints[0]}"
    for path, reason in [(not_text, "not a text file"), (tmp_path, "Is a directory"), (tmp_path / "no", "")]:
        with pytest.raises(SystemExit) as exit_info:
            predict_command.main([clips[0], checkpoint, "--decisions", f"--thresholds={path}"])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and f"cannot read the thresholds file {path}: {reason}" in error
        assert error.endswith("give a tag<TAB>threshold file such as a run's report/<model>/thresholds.tsv")
    run_folder = Path(random_checkpoints[0]).parent
    for arguments in ([clips[0], f"--checkpoint={run_folder}"], [f"--describe={run_folder}"]):
        with pytest.raises(SystemExit) as exit_info:
            predict_command.main(arguments)
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2
        assert error.endswith(
            f"{run_folder} is a run's folder; pass one of its checkpoints, e.g. --checkpoint={run_folder / 'swa'}"
        )


def test_metric_warnings_name_their_tags(tmp_path, capsys):
    tags = ("mood/theme---calm", "mood/theme---dark", "mood/theme---happy")
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 1, 1]], bool)
    scores = np.linspace(0.1, 0.9, labels.size).reshape(labels.shape)
    validation = split_predictions.Predictions(scores, np.array([[1, 0, 0], [0, 0, 1]] * 2, bool), ("a", "b", "c", "d"))
    test = split_predictions.Predictions(scores, labels, ("e", "f", "g", "h"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report.model_report("model", tags, validation, test)
    messages = [str(warning.message) for warning in caught]
    assert "tags dark have no positive track; their threshold is +inf (never positive)" in messages
    assert any(message.startswith("tags happy have only positive or only negative tracks") for message in messages)
    assert not any(message.startswith("tags [") for message in messages)
    # The evaluation command names them from its --thresholds file.
    np.save(tmp_path / "truth.npy", labels)
    np.save(tmp_path / "scores.npy", scores)
    thresholds.write(tmp_path / "thresholds.tsv", tags, np.full(3, 0.5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate.main(
            [
                f"--groundtruth={tmp_path / 'truth.npy'}",
                f"--predictions={tmp_path / 'scores.npy'}",
                f"--thresholds={tmp_path / 'thresholds.tsv'}",
            ]
        )
    assert [str(warning.message).split(" have")[0] for warning in caught] == ["tags happy"]
    capsys.readouterr()


def test_a_feature_process_that_dies_fails_only_its_file(clips, random_checkpoints, tmp_path):
    """What a file too long for the memory meets (the system kills its feature process): that file gets a row
    saying so, a fresh pool takes the others, and the run ends with status 1."""
    long = _wav(tmp_path / "a_long.wav", np.zeros(600 * 8000, np.int16), 8000, "PCM_16")  # first in order
    output = tmp_path / "rows.jsonl"
    command = [*PREDICT, long, *clips[:2], f"--checkpoint={random_checkpoints[0]}", f"--output={output}"]
    run = subprocess.Popen([*command, "--workers=1"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    worker = None
    while worker is None and time.monotonic() < deadline:
        for pid in Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split():
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in command_line:
                worker = int(pid)
        time.sleep(0.01)
    assert worker is not None, "no feature process started"
    os.kill(worker, signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 1 and "Traceback" not in stderr, stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["path"] for row in rows] == [long, *clips[:2]]
    assert rows[0]["error"] == "its feature process died (killed, or out of memory)"
    assert rows[1]["error"] is None and rows[2]["error"] is None


def _children(pid: int) -> set[int]:
    """The processes `pid` has started and not yet reaped."""
    try:
        return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_read_that_never_returns_gets_an_error_row_at_its_deadline_and_leaves_no_process(
    clips, random_checkpoints, tmp_path
):
    """A named pipe called x.mp3 that no one writes to (opening it blocks for ever, as a read from a hung network
    mount would) among good files: at its deadline (the floor: no header, so no duration) its feature process is
    killed, it gets an error row naming it, the files after it are tagged by a fresh process, and when the run ends
    none of the feature processes it started is left."""
    fifo = tmp_path / "x.mp3"
    os.mkfifo(fifo)
    output = tmp_path / "rows.csv"
    files = [clips[0], str(fifo), clips[1]]
    deadline = ["--deadline_floor_s=15", "--deadline_s_per_audio_s=1"]
    command = [*PREDICT, *files, f"--checkpoint={random_checkpoints[0]}", f"--output={output}", "--workers=1"]
    run = subprocess.Popen([*command, *deadline], cwd=REPO, stderr=subprocess.PIPE, text=True)
    started, give_up = set(), time.monotonic() + 300
    try:
        while run.poll() is None and time.monotonic() < give_up:
            started |= _children(run.pid)
            time.sleep(0.05)
    finally:
        run.kill()
        stderr = run.communicate()[1]
    assert run.returncode == 1 and "Traceback" not in stderr, stderr
    with output.open(newline="") as f:
        rows = {row["path"]: row["error"] for row in csv.DictReader(f)}
    assert list(rows) == files
    assert rows[clips[0]] == rows[clips[1]] == ""
    assert rows[str(fifo)].startswith("no features within 15 s, the deadline of a file of unknown duration")
    assert f"{fifo}: no features within 15 s" in stderr
    assert len(started) >= 2  # the hung process and the one that took the file after it
    time.sleep(0.5)
    assert [pid for pid in started if _running(pid)] == []


def test_a_track_s_windows_run_as_its_frames_come_and_give_the_whole_track_s_tags(clips, random_checkpoints):
    """Features that come in blocks of any size (a feature process sends them as it computes them) are cut into the
    whole track's windows as soon as their frames are there, keeping only a window's frames, and run in the same
    batches: the same windows, probabilities and embeddings as the whole track's features at once."""
    model = tagger.load_tagger(random_checkpoints[0], batch_size=2)
    stored = track_features.stored_file_features(clips[0], model.feature_settings)
    window = 40
    assert stored.shape[0] % window and stored.shape[0] > 3 * window
    for frames in (1, window - 1, window, window + 1, 2 * window, stored.shape[0]):
        for size in (1, 7, window, 1000):
            pieces = [stored[start : min(start + size, frames)] for start in range(0, frames, size)]
            cut = list(tagger.track_windows(iter(pieces), window))
            assert [(start, stop, weight) for start, stop, weight, _ in cut] == windowing.window_ranges(frames, window)
            for start, stop, _, frames_of_window in cut:
                np.testing.assert_array_equal(frames_of_window, stored[start:stop])
    whole = model.tag_stored(stored, window)
    streamed = model.tag_blocks((stored[start : start + 7] for start in range(0, len(stored), 7)), window)
    assert streamed.windows == whole.windows
    for field in ("probabilities", "window_probabilities", "window_embeddings", "embedding"):
        np.testing.assert_array_equal(getattr(streamed, field), getattr(whole, field), err_msg=field)
