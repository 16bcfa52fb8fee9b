"""Faults and mistakes of a training run, for real: `python -m emorf_jax.main` in subprocesses that get SIGTERM at a
random step, meet a live or a dead run's lock, resume from a truncated or missing checkpoint file, fill a disk (a
file size limit), or are given a wrong data_dir, config field or workdir."""

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

import pytest

from configs import faresnet
from emorf_jax import checkpoints, train, workdir_lock
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
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
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
    assert result.returncode == 0, result.stderr[-3000:]
    total = max(int(step) for step in re.findall(r"\] \[(\d+)\] ", result.stderr))
    return data_dir, workdir, total


def test_sigterm_at_a_random_step_saves_it_and_the_rerun_ends_as_an_uninterrupted_run(reference_run, tmp_path):
    data_dir, reference, total = reference_run
    assert not (reference / workdir_lock.LOCK_NAME).exists(), "a finished run leaves no lock"
    workdir = tmp_path / "preempted"
    signalled_after = random.randint(1, total - 2)
    process = subprocess.Popen(
        _command(data_dir, workdir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    logged, lines = [], []
    for line in process.stderr:  # read to the end, so that the pipe never fills
        lines.append(line)
        passed = re.search(r"\] \[(\d+)\] ", line)
        if passed:
            logged.append(int(passed.group(1)))
            if logged[-1] == signalled_after:
                process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM, "".join(lines[-30:])
    stops = [re.search(r"Stopped by a signal after step (\d+) of", line) for line in lines]
    (stopped_at,) = [int(stop.group(1)) for stop in stops if stop]
    saved_at, _, _ = _latest_params(workdir)
    # No step is lost: the last step that ran is the one saved.
    assert saved_at == stopped_at == max(logged) and signalled_after <= stopped_at < total, (signalled_after, logged)
    assert not (workdir / workdir_lock.LOCK_NAME).exists()

    rerun = _run(_command(data_dir, workdir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
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


def _with_file_size_limit(command: list[str], limit: int) -> list[str]:
    """The command in a process whose files cannot grow past `limit` bytes: a write beyond fails with EFBIG, as on
    a full disk (set before exec, as a fork of this multithreaded process must not run Python)."""
    program = (
        "import os, resource, signal, sys; limit = int(sys.argv[1]); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
    )
    return [sys.executable, "-c", program, str(limit), *command[1:]]


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
    full = _run(_with_file_size_limit(_command(data_dir, workdir), limit))
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
    assert rerun.returncode == 0, rerun.stderr[-3000:]
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
