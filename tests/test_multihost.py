"""Two real processes on JAX's multi-controller runtime (gloo CPU collectives, one device each) train as one
process with two devices does: `python -m emorf_jax.main --coordinator_address=... --num_processes=2`; a signal
or a full disk on one of them ends both alike."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import faresnet
from emorf_jax import checkpoints, distributed, train
from tests import file_size_limit
from tests.process_output import stderr_excerpt

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds for any run: a hang fails the test instead of blocking the suite
# One epoch of the test config: steps 1-3, resumable checkpoints at steps 2 and 3, evaluation, SWA and a
# snapshot at step 3.
OVERRIDES = {"num_epochs": 1, "checkpoint_every_steps": 2}


def _command(data_dir: Path, workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "emorf_jax.main",
        "--config=configs/faresnet.py:test",
        f"--config.dataset.data_dir={data_dir}",
        f"--workdir={workdir}",
        *(f"--config.{name}={value}" for name, value in OVERRIDES.items()),
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_two_processes(
    data_dir: Path, workdir: Path, extra_of_process=((), ()), wrap_process_0=lambda command: command
) -> list[subprocess.Popen]:
    """Process 0 and 1 of a two-process job on this machine, one CPU device each; their output goes to files
    beside the workdir (`<workdir>.<index>.out`, `.err`), so that no full pipe can stall them. `wrap_process_0`
    rewrites process 0's command (a file size limit)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    address = f"localhost:{_free_port()}"
    processes = []
    for index, extra in enumerate(extra_of_process):
        command = _command(
            data_dir, workdir, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={index}", *extra
        )
        with open(f"{workdir}.{index}.out", "w") as stdout, open(f"{workdir}.{index}.err", "w") as stderr:
            processes.append(
                subprocess.Popen(
                    wrap_process_0(command) if index == 0 else command,
                    cwd=REPO,
                    env=env,
                    stdout=stdout,
                    stderr=stderr,
                )
            )
    return processes


def _finish(processes: list[subprocess.Popen], workdir: Path) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process; all are killed if one outlives the timeout."""
    deadline = time.time() + TIMEOUT
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.time(), 1))
    finally:
        for process in processes:
            process.kill()
            process.wait()
    return [
        (process.returncode, Path(f"{workdir}.{index}.out").read_text(), Path(f"{workdir}.{index}.err").read_text())
        for index, process in enumerate(processes)
    ]


def _run_two_processes(data_dir: Path, workdir: Path) -> list[tuple[int, str, str]]:
    results = _finish(_start_two_processes(data_dir, workdir), workdir)
    for index, (returncode, _, stderr) in enumerate(results):
        assert returncode == 0, f"process {index}: {stderr_excerpt(stderr)}"
    return results


def _has_steps(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _latest(workdir: Path):
    with checkpoints.open_manager(str(workdir), checkpoints.LATEST, read_only=True) as manager:
        weights, _ = checkpoints.restore(manager)
        return manager.latest_step(), weights


@pytest.fixture(scope="module")
def single_process_run(prepared_data_dir, tmp_path_factory):
    """The same job in this process with its two devices (conftest), on the same global batches."""
    data_dir, _ = prepared_data_dir
    config = faresnet.get_config("test")
    config.dataset.data_dir = str(data_dir)
    config.update(OVERRIDES)
    workdir = tmp_path_factory.mktemp("one_process")
    train.train_and_evaluate(config, str(workdir))
    return data_dir, workdir


def test_two_processes_killed_and_resumed_end_as_one_process_with_two_devices(single_process_run, tmp_path):
    data_dir, reference = single_process_run
    workdir = tmp_path / "two_processes"
    processes = _start_two_processes(data_dir, workdir)
    deadline = time.time() + TIMEOUT
    while not _has_steps(workdir / checkpoints.LATEST) and time.time() < deadline:
        if any(p.poll() is not None for p in processes):
            break
        time.sleep(0.01)
    for process in processes:
        process.send_signal(signal.SIGKILL)
    outputs = _finish(processes, workdir)
    assert _has_steps(workdir / checkpoints.LATEST), (
        "no checkpoint before a process ended or the timeout: "
        + " | ".join(stderr_excerpt(stderr) for _, _, stderr in outputs)
    )
    killed_at, _ = _latest(workdir)
    reference_step, reference_weights = _latest(reference)
    assert killed_at < reference_step, "the kill must interrupt the run before its end"
    assert not (workdir / "report").exists()

    (_, stdout_0, _), (_, stdout_1, stderr_1) = _run_two_processes(data_dir, workdir)
    step, weights = _latest(workdir)
    assert step == reference_step
    # Gradients, BatchNorm statistics and mixup spanned both processes: the same weights as one process with
    # both devices (on this CPU to the last bit; the tolerance allows for other collectives' summation order).
    for name in ("params", "average_params", "batch_stats"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), weights[name], reference_weights[name]
        )
    # Each process predicted its share of every evaluation batch with its own copy of the weights.
    report = json.loads((workdir / "report" / "test_report.json").read_text())
    reference_report = json.loads((reference / "report" / "test_report.json").read_text())
    assert report.keys() == reference_report.keys() >= {"final", "selected", "swa", "snapshot_ensemble_1"}
    for name in report:
        for figure, value in reference_report[name].items():
            assert report[name][figure] == pytest.approx(value, abs=1e-6), (name, figure)
        if name != "constant_predictor":
            np.testing.assert_allclose(
                np.load(workdir / "report" / name / "test_predictions.npy"),
                np.load(reference / "report" / name / "test_predictions.npy"),
                atol=1e-6,
            )
    # Process 0 alone reports, logs and writes; the other one says nothing unless something is wrong.
    assert "snapshot_ensemble_1" in stdout_0 and "test set" not in stdout_1
    assert "JAX process 1/2" in stderr_1 and "step 3:" not in stderr_1
    assert json.loads((workdir / "config.json").read_text()) == json.loads((reference / "config.json").read_text())


def test_a_signal_to_one_process_stops_every_process_after_the_same_saved_step(prepared_data_dir, tmp_path):
    """JAX's preemption service carries the notice to the other process (a SIGINT, Ctrl-C, is relayed to it as a
    SIGTERM); both save the step they agree on. The signalled process exits 130, the other 143, as a preempted
    process: one run covers both signals' handling across processes (a SIGTERM received directly:
    tests/test_faults_training.py)."""
    signal_number = signal.SIGINT
    data_dir, _ = prepared_data_dir
    workdir = tmp_path / "preempted"
    longer = ("--config.num_epochs=2", "--config.log_every_steps=1")  # steps 1-7, each logged by process 0
    processes = _start_two_processes(data_dir, workdir, (longer, longer))
    deadline = time.time() + TIMEOUT
    log_0 = Path(f"{workdir}.0.err")
    while "] [2] " not in log_0.read_text() and time.time() < deadline and processes[0].poll() is None:
        time.sleep(0.01)
    processes[1].send_signal(signal_number)
    outputs = _finish(processes, workdir)
    stops = []
    for index, (returncode, _, stderr) in enumerate(outputs):
        expected = 128 + (signal_number if index == 1 else signal.SIGTERM)
        assert returncode == expected, f"process {index}: {stderr_excerpt(stderr)}"
        stops += [int(step) for step in re.findall(r"Stopped by a signal after step (\d+) of \d+", stderr)]
    assert len(stops) == 2 and stops[0] == stops[1] and 2 <= stops[0] < 7, stops
    assert _latest(workdir)[0] == stops[0]


def test_a_full_disk_on_one_process_ends_every_process_at_once_with_the_same_line(single_process_run, tmp_path):
    """Process 0, which writes the checkpoints, meets a file size limit during its first save; process 1, then
    waiting for it inside the save, must end at once with the same line and status, not be aborted by the runtime
    when process 0, which serves the coordination service, exits."""
    data_dir, reference = single_process_run
    first_save = min(_steps(reference / checkpoints.LATEST))
    limit = _largest_file(reference / checkpoints.LATEST / str(first_save)).stat().st_size // 2
    workdir = tmp_path / "full"
    processes = _start_two_processes(
        data_dir, workdir, wrap_process_0=lambda command: file_size_limit.command(command, limit)
    )
    ended = [None, None]
    deadline = time.time() + TIMEOUT
    while None in ended and time.time() < deadline:
        for index, process in enumerate(processes):
            if ended[index] is None and process.poll() is not None:
                ended[index] = time.time()
        time.sleep(0.05)
    outputs = _finish(processes, workdir)
    lines = []
    for index, (returncode, _, stderr) in enumerate(outputs):
        assert returncode == 1, f"process {index}: {stderr_excerpt(stderr)}"
        lines.append([line for line in stderr.splitlines() if line.startswith("error: ")])
    assert lines[0] == lines[1] and len(lines[0]) == 1, lines
    checkpoints_dir = re.escape(str(workdir / checkpoints.LATEST))
    assert re.fullmatch(
        rf"error: out of disk space \(File too large\) while writing the checkpoint of step \d+ in {checkpoints_dir}; "
        "free space and run the same command again",
        lines[0][0],
    ), lines[0][0]
    assert "Traceback" not in outputs[1][2]
    assert abs(ended[0] - ended[1]) < distributed.NOTICE_SECONDS, "the other process ended at once, not at a timeout"


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_processes_started_with_different_configs_are_refused(prepared_data_dir, tmp_path):
    data_dir, _ = prepared_data_dir
    workdir = tmp_path / "w"
    results = _finish(_start_two_processes(data_dir, workdir, ((), ("--config.model.rho=3",))), workdir)
    for returncode, _, stderr in results:
        assert returncode != 0
        assert (
            "2 processes were started with different configs: process 1 differs from process 0 in model.rho" in stderr
        ), stderr_excerpt(stderr)
    assert not (workdir / "config.json").exists()


def test_a_partial_set_of_explicit_flags_or_no_cluster_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="--coordinator_address and --process_id missing"):
        distributed.initialize(auto_detect=False, num_processes=2)
    distributed.initialize(auto_detect=False)  # nothing asked: one process, nothing started
    assert jax.process_count() == 1
    # Detection outside any cluster, in a process whose backend is not started yet (as main.py's is not).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "KUBERNETES_", "JAX_COORD"))}
    result = subprocess.run(
        [sys.executable, "-c", "from emorf_jax import distributed; distributed.initialize(auto_detect=True)"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode != 0
    assert "no SLURM, Open MPI, Cloud TPU or Kubernetes job was detected" in result.stderr, stderr_excerpt(
        result.stderr
    )
