"""The benchmark scripts run in their quick modes, so that they cannot rot; their timings are not checked here."""

import json
from pathlib import Path
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_METADATA = REPO.parent / "shared" / "mtg-jamendo" / "data"


def _run(*arguments: str) -> str:
    result = subprocess.run([sys.executable, "-m", *arguments], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_input_pipeline_benchmark_reads_exactly_its_crops(tmp_path):
    output = _run("benchmarks.input_pipeline", "--quick", "--out", str(tmp_path))
    figures = json.loads(output[output.index("{"):])
    assert figures["examples_per_s"] > 0
    assert 0.5 < figures["bytes_read_per_crop_byte"] <= 1.0  # below 1 only for tracks shorter than the crop


@pytest.mark.skipif(not REAL_METADATA.is_dir(), reason=f"real MTG-Jamendo metadata not found at {REAL_METADATA}")
def test_batch_correlation_benchmark_finds_no_repeated_track_in_the_new_batches():
    output = _run("benchmarks.batch_correlation", "--quick", "--seeds", "0")
    assert "new" in output and "old" in output
