"""`python -m emorf_jax.rf_sweep` at tiny sizes: it trains a run per (ρ, seed) with the command line's config overrides,
writes the table and the plot, and a sweep killed for real after its first run continues without training that run
again; the table's figures; the mistakes it refuses before any work."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emorf_jax import checkpoints, report, rf_sweep, run_folder
from emorf_jax.models import receptive_field
from tests.process_output import stderr_excerpt

REPO = Path(__file__).resolve().parents[1]
RHOS = (1, 2)
# Held for every run the sweep starts: the test variant's epochs (as the issue's example) and a field it sets otherwise.
OVERRIDES = ("--config.num_epochs=2", "--config.input.max_time_shift=7")


def _command(data_dir: Path, workdir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "emorf_jax.rf_sweep",
        "--config=configs/faresnet.py:test",
        f"--rho={','.join(map(str, RHOS))}",
        "--seeds=1",
        f"--config.dataset.data_dir={data_dir}",
        *OVERRIDES,
        f"--workdir={workdir}",
    ]


def _kill_once_started(command: list[str], started: Path) -> None:
    """Starts the sweep and SIGKILLs it as soon as `started` (the second run's config.json) appears: the first run
    is then finished, thresholds and all, and the second has begun."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not started.exists():
        assert process.poll() is None, "the sweep ended before its second run began"
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _modification_times(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def test_a_killed_sweep_continues_without_retraining_its_finished_run(prepared_data_dir, tmp_path):
    data_dir, _ = prepared_data_dir
    workdir = tmp_path / "sweep"
    first, second = (Path(rf_sweep.run_workdir(str(workdir), rho, 0)) for rho in RHOS)
    _kill_once_started(_command(data_dir, workdir), second / "config.json")
    assert run_folder.is_finished(str(first)) and not run_folder.is_finished(str(second))
    finished_files = _modification_times(first)

    result = subprocess.run(_command(data_dir, workdir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, stderr_excerpt(result.stderr)
    assert _modification_times(first) == finished_files, "the finished run was touched again"
    assert run_folder.is_finished(str(second))
    for run_dir in (first, second):
        saved = json.loads((run_dir / run_folder.CONFIG_FILE).read_text())
        assert (saved["num_epochs"], saved["input"]["max_time_shift"]) == (2, 7), run_dir
        assert saved["dataset"]["data_dir"] == str(data_dir)

    table = (workdir / "rf_sweep.md").read_text()
    assert table in result.stdout
    summary = json.loads((workdir / "rf_sweep.json").read_text())
    assert [row["rho"] for row in summary["rows"]] == list(RHOS)
    for row, run_dir in zip(summary["rows"], (first, second)):
        rho = row["rho"]
        assert (row["published_rf"], row["exact_rf"]) == (
            receptive_field.published_rf(rho),
            receptive_field.exact_rf(rho),
        )
        assert f"| {rho} | {row['published_rf']} | {row['exact_rf']} | 0 |" in table
        test_report = json.loads((run_dir / report.RUN_REPORT_DIR / report.RUN_SUMMARY).read_text())
        _, swa_meta = checkpoints.load_checkpoint(str(run_dir / checkpoints.SWA))
        assert row["swa_test"] == {"mean": test_report["swa"]["PR-AUC-macro"], "sd": None}  # one seed: no SD
        assert row["swa_validation"]["mean"] == swa_meta["validation"]["PR-AUC-macro"]
    assert (workdir / "rf_sweep.png").stat().st_size > 10_000


def _result(rho: int, seed: int, swa_test: float | None) -> rf_sweep.RunResult:
    swa = {"validation": None if swa_test is None else 0.5, "test": swa_test}
    return rf_sweep.RunResult(rho, seed, {"swa": swa, "selected": {"validation": 0.4, "test": 0.3}})


def test_rows_give_mean_and_sample_sd_over_seeds_and_name_a_missing_model():
    rows = rf_sweep.sweep_rows([_result(3, 1, 0.6), _result(1, 0, None), _result(3, 0, 0.4), _result(1, 1, None)])
    assert [(row.rho, row.seeds) for row in rows] == [(1, [0, 1]), (3, [0, 1])]
    assert rows[1].mean("swa", "test") == pytest.approx(0.5)
    assert rows[1].sd("swa", "test") == pytest.approx(math.sqrt(0.02))  # sample SD of 0.4 and 0.6
    table = rf_sweep.markdown_table(rows)
    assert "| 1 | 17 | 31 | 0,1 | n/a | n/a | 0.4000 ± 0.0000 | 0.3000 ± 0.0000 |" in table
    assert "| 3 | 49 |" in table and "0.5000 ± 0.1414" in table


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--config=configs/vggish.py:test"], "rho sets the kernels of the CP-ResNet family"),
        (["--config=configs/faresnet.py:test", "--rho=1,99"], "rho must be"),
        (["--config=configs/faresnet.py:test", "--rho=1,1"], "distinct values"),
        (["--config=configs/nothing.py"], "configs/nothing.py"),
        (["--config=configs/faresnet.py:test", "--config.num_epoch=2"], 'Did you mean "num_epochs"'),
        (["--config=configs/faresnet.py:test", "--data_dir=/tmp"], "Unknown command line flag 'data_dir'"),
        (["--config=configs/faresnet.py:test", "--baselines=resnet18,resnet101"], "use some of resnet18"),
    ],
)
def test_clear_errors_before_any_training(arguments, message, tmp_path):
    """One line on stderr, exit status 2 and nothing written, as `python -m emorf_jax.main` refuses a mistake."""
    workdir = tmp_path / "sweep"
    command = [sys.executable, "-m", "emorf_jax.rf_sweep", *arguments, f"--workdir={workdir}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, stderr_excerpt(result.stderr)
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    assert not workdir.exists(), "nothing may be written before the arguments are checked"


def test_baseline_rows_follow_the_rho_rows_with_their_exact_rf(tmp_path):
    figures = {"swa": {"validation": 0.5, "test": 0.45}, "selected": {"validation": 0.4, "test": 0.3}}
    results = [
        rf_sweep.RunResult(None, 0, figures, "resnet50"),
        _result(3, 0, 0.4),
        rf_sweep.RunResult(None, 0, figures, "resnet18"),
        rf_sweep.RunResult(None, 1, figures, "resnet18"),
    ]
    rows = rf_sweep.sweep_rows(results)
    assert [row.label for row in rows] == ["3", "ResNet-18", "ResNet-50"]
    assert (rows[1].published_rf, rows[1].exact_rf, rows[1].seeds) == (None, 435, [0, 1])
    table = rf_sweep.markdown_table(rows)
    assert "| ResNet-18 | - | 435 | 0,1 | 0.5000 ± 0.0000 | 0.4500 ± 0.0000 |" in table
    assert "| ResNet-50 | - | 427 | 0 |" in table
    rf_sweep.write_results(rows, results, str(tmp_path))
    summary = json.loads((tmp_path / "rf_sweep.json").read_text())
    assert [row["baseline"] for row in summary["rows"]] == [None, "resnet18", "resnet50"]
    assert (tmp_path / "rf_sweep.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="use one of resnet18, resnet34, resnet50"):
        rf_sweep.baseline_config("vgg19", "test", 0, str(tmp_path))
