"""Faults and mistakes of a training run, for real: `python -m emorf_jax.main` in subprocesses that get SIGTERM or
SIGINT at a seeded random step, meet a live or a dead run's lock, resume from a truncated or missing checkpoint
file or from whole checkpoints of another model structure, make the final report over damaged final checkpoints,
fill a disk (a file size limit), or are given a wrong data_dir, config field or workdir."""

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import faresnet
from emorf_jax import checkpoints, ensemble, train, workdir_lock
from tests import file_size_limit
from tests.process_output import stderr_excerpt
from tests.test_train import _assert_same_end, _latest_params
from tests.test_train import _command as train_command

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600
OVERRIDES = ("--config.log_every_steps=1",)  # a log line per step: the test sees which steps have passed


def _command(data_dir: Path, workdir: Path, *overrides: str) -> list[str]:
    return train_command(data_dir, workdir, *OVERRIDES, *overrides)


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _assert_one_line_refusal(result: subprocess.CompletedProcess, *needles: str, status: int = 2) -> str:
    assert result.returncode == status, stderr_excerpt(result.stderr)
    assert "Traceback" not in result.stderr, stderr_excerpt(result.stderr)
    (line,) = _error_lines(result.stderr)
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture(scope="module")
def reference_run(prepared_data_dir, tmp_path_factory):
    """An uninterrupted run, and its number of steps."""
    data_dir, _ = prepared_data_dir
    workdir = tmp_path_factory.mktemp("reference")
    result = _run(_command(data_dir, workdir))
    assert result.returncode == 0, stderr_excerpt(result.stderr)
    total = max(int(step) for step in re.findall(r"\] \[(\d+)\] ", result.stderr))
    return data_dir, workdir, total


@pytest.mark.parametrize(
    "signal_number, seed", [(signal.SIGTERM, 0), (signal.SIGINT, 1)], ids=["SIGTERM-seed0", "SIGINT-seed1"]
)
def test_a_signal_at_a_random_step_saves_it_and_the_rerun_ends_as_an_uninterrupted_run(
    reference_run, tmp_path, signal_number, seed
):
    """SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C, sent to the run's process group as a terminal does)
    after a step drawn by `random.Random(seed)`: the run saves the step in progress and exits 128 + the signal
    (143, 130); the same command then resumes and ends as the uninterrupted run."""
    data_dir, reference, total = reference_run
    assert not (reference / workdir_lock.LOCK_NAME).exists(), "a finished run leaves no lock"
    workdir = tmp_path / "interrupted"
    signalled_after = random.Random(seed).randint(1, total - 2)
    process = subprocess.Popen(
        _command(data_dir, workdir),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    logged, lines, signalled = [], [], False
    for line in process.stderr:  # read to the end, so that the pipe never fills
        lines.append(line)
        passed = re.search(r"\] \[(\d+)\] ", line)
        if passed:
            logged.append(int(passed.group(1)))
            if logged[-1] == signalled_after and not signalled:  # once: a second Ctrl-C stops without a save
                if signal_number == signal.SIGINT:
                    os.killpg(process.pid, signal.SIGINT)
                else:
                    process.send_signal(signal_number)
                signalled = True
    assert process.wait(timeout=TIMEOUT) == 128 + signal_number, "".join(lines[-30:])
    stops = [re.search(r"Stopped by a signal after step (\d+) of", line) for line in lines]
    (stopped_at,) = [int(stop.group(1)) for stop in stops if stop]
    saved_at, _, _ = _latest_params(workdir)
    # No step is lost: the last step that ran is the one saved.
    assert saved_at == stopped_at == max(logged) and signalled_after <= stopped_at < total, (signalled_after, logged)
    assert not (workdir / workdir_lock.LOCK_NAME).exists()

    rerun = _run(_command(data_dir, workdir))
    assert rerun.returncode == 0, stderr_excerpt(rerun.stderr)
    assert f"Resuming from step {stopped_at}" in rerun.stderr
    _assert_same_end(workdir, reference)


def _holder(workdir: Path) -> subprocess.Popen:
    """Another process that holds the workdir's lock until it is killed."""
    program = (
        "import sys, time; from emorf_jax import workdir_lock\n"
        "with workdir_lock.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", program, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_run_on_a_live_workdir_is_refused_and_a_dead_runs_lock_is_taken_over(prepared_data_dir, tmp_path):
    data_dir, _ = prepared_data_dir
    workdir = tmp_path / "busy"
    holder = _holder(workdir)
    try:
        refused = _run(_command(data_dir, workdir))
    finally:
        holder.kill()
        holder.wait()
    _assert_one_line_refusal(
        refused, f"in use by pid {holder.pid} on host {socket.gethostname()} since ", str(workdir / "run.lock")
    )
    assert sorted(os.listdir(workdir)) == ["run.lock"], "a refused run writes nothing"

    # The holder died without removing its lock (SIGKILL): the next run takes it over.
    assert json.loads((workdir / "run.lock").read_text())["pid"] == holder.pid
    with workdir_lock.hold(str(workdir)) as path:
        assert json.loads(Path(path).read_text())["pid"] == os.getpid()
    assert not (workdir / "run.lock").exists()


def test_a_lock_from_another_host_is_stale_once_its_heartbeat_is_old(tmp_path):
    path = Path(workdir_lock.lock_path(str(tmp_path)))
    path.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(workdir_lock.WorkdirLocked, match="pid .* on host elsewhere since 2026-01-01"):
        workdir_lock.acquire(str(tmp_path))
    old = time.time() - workdir_lock.STALE_SECONDS - 1
    os.utime(path, (old, old))
    assert workdir_lock.acquire(str(tmp_path)) == str(path)
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    workdir_lock.release(str(path))
    assert not path.exists()


def _copy_of_run(reference: Path, destination: Path) -> Path:
    """The reference run's workdir without its report: as the run left it just before its final report."""
    shutil.copytree(reference, destination)
    shutil.rmtree(destination / "report")
    return destination


def _resumable_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / checkpoints.LATEST).iterdir() if p.name.isdigit())


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_an_unreadable_latest_checkpoint_is_named_and_the_one_before_restored(reference_run, tmp_path, damage, caplog):
    _, reference, _ = reference_run
    workdir = _copy_of_run(reference, tmp_path / "damaged")
    previous, last = _resumable_steps(workdir)[-2:]
    if damage == "truncate":
        data = _largest_file(workdir / checkpoints.LATEST / str(last))
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    else:
        (workdir / checkpoints.LATEST / str(last) / "meta" / "metadata").unlink()
    with caplog.at_level("WARNING"):
        restored = checkpoints.restore_resumable(str(workdir), target=None)
    assert int(restored["step"]) == previous
    (line,) = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert f"checkpoint of step {last} cannot be read" in line and str(workdir / "damaged") in line
    assert _resumable_steps(workdir) == [previous]
    assert (workdir / "damaged" / f"{checkpoints.LATEST}-{last}").is_dir()


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _files(directory: Path) -> dict[str, int]:
    """Every file under `directory` by its relative path, with its size."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()}


def test_damaged_final_checkpoints_are_named_and_left_out_of_the_report_and_the_status_says_so(reference_run, tmp_path):
    """After training, `swa/` and the last snapshot are damaged; the same command on the finished run makes the
    final report again, from the intact models only, and exits with 3."""
    data_dir, reference, _ = reference_run
    workdir = tmp_path / "damaged_final"
    shutil.copytree(reference, workdir)
    (swa_step,) = _steps(workdir / checkpoints.SWA)
    snapshot_steps = _steps(workdir / checkpoints.SNAPSHOTS)
    members = snapshot_steps[-faresnet.get_config("test").snapshots.ensemble_size :]
    assert len(members) == 2, snapshot_steps
    swa_data = _largest_file(workdir / checkpoints.SWA / str(swa_step) / "weights" / "d")
    swa_data.write_bytes(swa_data.read_bytes()[: swa_data.stat().st_size // 2])
    (workdir / checkpoints.SNAPSHOTS / str(members[-1]) / "meta" / "metadata").unlink()

    rerun = _run(_command(data_dir, workdir))
    assert rerun.returncode == 3, stderr_excerpt(rerun.stderr)
    assert not _error_lines(rerun.stderr), stderr_excerpt(rerun.stderr)
    assert "Traceback" not in rerun.stderr, stderr_excerpt(rerun.stderr)
    left_out = re.findall(r"Left out of the report: the checkpoint (\S+) cannot be read \(\w+", rerun.stderr)
    damaged = [workdir / checkpoints.SWA / str(swa_step), workdir / checkpoints.SNAPSHOTS / str(members[-1])]
    assert sorted(left_out) == sorted(map(str, damaged)), stderr_excerpt(rerun.stderr)

    report = json.loads((workdir / "report" / "test_report.json").read_text())
    reference_report = json.loads((reference / "report" / "test_report.json").read_text())
    assert set(report) == {"final", "selected", "snapshot_ensemble_1", "constant_predictor"}
    assert sorted(p.name for p in (workdir / "report").iterdir() if p.is_dir()) == [
        "final",
        "selected",
        "snapshot_ensemble_1",
    ], "the folders of the models left out are gone with them"
    for name in ("final", "selected"):
        assert report[name]["PR-AUC-macro"] == pytest.approx(reference_report[name]["PR-AUC-macro"], abs=1e-6)
    # The snapshot ensemble is the intact member alone: its predictions are that snapshot's.
    (intact,), _ = ensemble.checkpoint_members(
        [str(workdir / checkpoints.SNAPSHOTS / str(members[0]))], str(data_dir), batch_size=8
    )
    np.testing.assert_allclose(
        np.load(workdir / "report" / "snapshot_ensemble_1" / "test_predictions.npy"),
        intact["test"].probabilities,
        atol=1e-6,
    )
    assert "Tag music with the model just trained" not in rerun.stdout


_RESTORE_A_TRUNCATED_CHECKPOINT = """
import gc, pathlib, sys
import numpy as np
from emorf_jax import checkpoints

manager = checkpoints.open_manager(sys.argv[1], checkpoints.SWA)
checkpoints.save(manager, 1, {f"layer{i}": np.ones((64, 64, 3, 3), np.float32) for i in range(40)}, {})
data = max(pathlib.Path(sys.argv[1], "swa", "1", "weights", "d").iterdir(), key=lambda p: p.stat().st_size)
data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
try:
    checkpoints.restore(checkpoints.open_manager(sys.argv[1], checkpoints.SWA, read_only=True), 1)
except ValueError as error:
    print("restore failed:", str(error).split(":")[0])


class RaisesWhenCollected:
    def __del__(self):
        raise ZeroDivisionError("an unraisable error of ours")


RaisesWhenCollected()
gc.collect()
"""


def test_a_failed_restore_prints_no_traceback_of_the_reads_it_abandoned_and_other_unraisable_errors_still_show(
    tmp_path,
):
    """Forty arrays, the data file cut in half: the restore raises, and the reads still in flight end quietly on
    orbax's closed event loop, while an unraisable error of another kind is still printed."""
    result = _run([sys.executable, "-c", _RESTORE_A_TRUNCATED_CHECKPOINT, str(tmp_path)])
    assert result.returncode == 0, stderr_excerpt(result.stderr)
    assert "restore failed: OUT_OF_RANGE" in result.stdout, result.stdout
    assert "Event loop is closed" not in result.stderr, stderr_excerpt(result.stderr)
    assert result.stderr.count("Traceback") == 1, stderr_excerpt(result.stderr)
    assert "ZeroDivisionError: an unraisable error of ours" in result.stderr, stderr_excerpt(result.stderr)


def test_a_resumable_checkpoint_of_another_model_structure_stops_the_run_in_one_line_and_moves_nothing(
    reference_run, tmp_path
):
    """A code change that reshapes the model (simulated: the run's recorded config edited to the new model's, so
    that the config check passes) meets whole checkpoints of the old model: not damage."""
    data_dir, reference, _ = reference_run
    workdir = _copy_of_run(reference, tmp_path / "changed_model")
    recorded = json.loads((workdir / "config.json").read_text())
    recorded["model"]["base_channels"] = 8
    (workdir / "config.json").write_text(json.dumps(recorded, indent=2, sort_keys=True))
    before = _files(workdir)
    last = _resumable_steps(workdir)[-1]

    changed = _run(_command(data_dir, workdir, "--config.model.base_channels=8"))
    _assert_one_line_refusal(
        changed,
        f"the resumable checkpoint of step {last} in {workdir / checkpoints.LATEST} holds a model of another "
        "structure than the config builds: params/feed_forward_conv/kernel is shape (1, 1, 16, 9) there and shape "
        "(1, 1, 32, 9) in the model",
        "the checkpoint is whole and was left as it is",
    )
    assert "cannot be read" not in changed.stderr
    assert _files(workdir) == before, "nothing is moved, removed or written"


def test_a_structure_check_names_a_parameter_added_or_removed():
    stored = {"params/conv/kernel": (3, 3, 1, 4), "params/old/bias": (4,)}
    same = {"params": {"conv": {"kernel": np.zeros((3, 3, 1, 4))}, "old": {"bias": np.zeros(4)}}}
    checkpoints.check_structure(stored, same, "C")
    added = {"params": {**same["params"], "new": {"bias": np.zeros(2)}}}
    with pytest.raises(checkpoints.StructureMismatch, match=r"params/new/bias is absent there and shape \(2,\)"):
        checkpoints.check_structure(stored, added, "C")
    removed = {"params": {"conv": same["params"]["conv"]}}
    with pytest.raises(checkpoints.StructureMismatch, match=r"params/old/bias is shape \(4,\) there and absent in"):
        checkpoints.check_structure(stored, removed, "C")


def test_a_truncated_checkpoint_then_a_full_disk_cost_one_line_each_and_the_rerun_ends_as_uninterrupted(
    reference_run, tmp_path
):
    """A run resumes past a truncated latest checkpoint, then its disk fills during a save; freed, it ends where an
    uninterrupted run ends."""
    data_dir, reference, _ = reference_run
    workdir = _copy_of_run(reference, tmp_path / "full")
    previous, last = _resumable_steps(workdir)[-2:]
    data = _largest_file(workdir / checkpoints.LATEST / str(last))
    data.write_bytes(data.read_bytes()[:100])
    limit = _largest_file(workdir / checkpoints.LATEST / str(previous)).stat().st_size // 2
    full = _run(file_size_limit.command(_command(data_dir, workdir), limit))
    assert f"checkpoint of step {last} cannot be read" in full.stderr
    assert f"Resuming from step {previous}" in full.stderr
    _assert_one_line_refusal(
        full,
        f"out of disk space (File too large) while writing the checkpoint of step {last} in {workdir}",
        "free space and run the same command again",
        status=1,
    )
    assert _resumable_steps(workdir) == [previous] and _latest_params(workdir)[0] == previous
    assert list(workdir.rglob("*.orbax-checkpoint-tmp*")), "the failed save stopped half-way"
    assert not (workdir / workdir_lock.LOCK_NAME).exists()

    rerun = _run(_command(data_dir, workdir))
    assert rerun.returncode == 0, stderr_excerpt(rerun.stderr)
    _assert_same_end(workdir, reference)
    assert not list(workdir.rglob("*.orbax-checkpoint-tmp*")), "the failed save's temporary directory is removed"


def test_a_mistaken_command_costs_one_line_and_leaves_the_workdir_for_the_corrected_one(reference_run, tmp_path):
    data_dir, reference, _ = reference_run
    workdir = tmp_path / "run"
    wrong_data = _run(_command(tmp_path / "no_data", workdir))
    _assert_one_line_refusal(wrong_data, "python -m data_prep.build")
    assert not workdir.exists(), "nothing is written before the checks pass"
    config = faresnet.get_config("test")
    config.dataset.data_dir = str(data_dir)
    config.log_every_steps = 1
    train.check_run(config, str(workdir))  # the corrected command is not refused as "another config"

    typo = _run(_command(data_dir, workdir, "--config.batch_sise=8"))
    _assert_one_line_refusal(typo, "batch_sise", 'Did you mean "batch_size"')
    checkpoint_folder = _run(_command(data_dir, reference / checkpoints.SWA))
    _assert_one_line_refusal(checkpoint_folder, f"give --workdir={reference} to resume that run")
    other_tags = _run(_command(data_dir, workdir, "--config.num_classes=56"))
    _assert_one_line_refusal(other_tags, "has 9 tags", "num_classes=56", "--config.num_classes=0")
    assert not workdir.exists()
