"""The benchmark scripts run in their quick modes, so that they cannot rot; their timings are not checked here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import paper_table, reference_data, step_profile
from tests.process_output import stderr_excerpt

REPO = Path(__file__).resolve().parents[1]
REAL_METADATA = reference_data.MTG_JAMENDO_METADATA


def _run(*arguments: str) -> str:
    result = subprocess.run([sys.executable, "-m", *arguments], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, stderr_excerpt(result.stderr)
    return result.stdout


def test_input_pipeline_benchmark_reads_exactly_its_crops(tmp_path):
    output = _run("benchmarks.input_pipeline", "--quick", "--out", str(tmp_path))
    figures = json.loads(output[output.index("{") :])
    assert figures["examples_per_s"] > 0 and figures["examples_per_s_as_prepared"] > 0
    assert figures["examples_per_s_verifying_checksums"] > 0
    assert figures["examples_per_s_to_device"] > 0 and figures["step_normalisation_ms_per_example"] > 0
    assert figures["as_training_tracks"] == 9949 and figures["training_tracks"] < 9949
    assert 0.5 < figures["bytes_read_per_crop_byte"] <= 1.0  # below 1 only for tracks shorter than the crop


def test_data_prep_benchmark_quick_builds_both_inputs_and_reports_their_rates(tmp_path):
    output = _run("benchmarks.data_prep", "--quick", "--out", str(tmp_path))
    figures = json.loads(output[output.index("{") :])
    for source in ("mp3", "npy"):
        assert figures[source]["tracks"] > 0 and figures[source]["rtf_per_core"] > 0
        assert figures[source]["peak_pss_total_mib"] > 0


@pytest.mark.skipif(not REAL_METADATA.is_dir(), reason=f"real MTG-Jamendo metadata not found at {REAL_METADATA}")
def test_preparation_memory_benchmark_keeps_the_schedule_within_its_budget_and_the_workers_busy():
    """64 workers over split-0's real lengths: the budget binds (the longest-first order would hold 18 GiB), and
    with each track's memory estimated from what its worker buffers, stage 1 stays within 20 % of a perfect split."""
    output = _run("benchmarks.preparation_memory", "--workers", "64", "--memory_budget_gb", "8")
    unbudgeted, scheduled = (
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith(("| longest first", "| the build's"))
    )
    assert float(unbudgeted[1].split()[0]) > 8.0 >= float(scheduled[1].split()[0])
    assert float(scheduled[2]) < 1.2, output


@pytest.mark.skipif(not REAL_METADATA.is_dir(), reason=f"real MTG-Jamendo metadata not found at {REAL_METADATA}")
def test_batch_correlation_benchmark_finds_no_repeated_track_in_the_new_batches():
    output = _run("benchmarks.batch_correlation", "--quick", "--seeds", "0")
    repeated = {}  # pipeline -> (batches, batches holding a repeated track), from the table's seed-0 rows
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 6 and cells[1] == "0":
            repeated[cells[0].split(",")[0]] = (int(cells[2]), int(cells[3].split("(")[1].rstrip(")")))
    assert set(repeated) == {"old", "new"}, output
    assert repeated["new"][0] == 375 and repeated["new"][1] == 0  # 3 epochs of 2,000 tracks at batch 16
    assert repeated["old"][1] > 0.2 * repeated["old"][0]  # the count sees repeats where there are some


def test_paper_table_quick_trains_its_rows_and_prints_them_beside_the_published_ones(tmp_path):
    output = _run("benchmarks.paper_table", "--quick", "--rows", "vggish_essentia96,popularity", "--out", str(tmp_path))
    assert "SYNTHETIC" in output and "REAL" in output
    rows = json.loads((tmp_path / "paper_table.json").read_text())
    assert [row["config"] for row in rows] == ["vggish_essentia96", "popularity"]  # the first on made .npy files
    for row in rows:
        assert 0 < row["ours"]["PR-AUC-macro"] <= 1 and 0 <= row["ours"]["ROC-AUC-macro"] <= 1
    assert rows[1]["ours"]["ROC-AUC-macro"] == 0.5  # one constant column: no ranking at all
    assert rows[0]["published_validation"] is None and "published validation PR-AUC" in output  # not on the slides
    if (reference_data.MEDIAEVAL2019 / "baseline" / "results.tsv").is_file():
        assert rows[0]["published"]["PR-AUC-macro"] == 0.107734 and "| n/a | 0.1077 | 0.7258 |" in output
    else:
        assert rows[0]["published"] is None and "n/a" in output


# The MediaEval 2019 slides: validation PR-AUC-macro of every row they show, and CP_ResNet's test PR-AUC, which no
# results file holds (it was not submitted).
SLIDES_VALIDATION = {
    "shake_faresnet": 0.1132,
    "faresnet": 0.1149,
    "avg_ensemble": 0.1189,
    "resnet34": 0.0924,
    "crnn": 0.0924,
    "cp_resnet": 0.1097,
}
# The official test PR-AUC-macro of each submitted row (the task's results tables).
OFFICIAL_TEST = {
    "vggish_essentia96": 0.107734,
    "resnet34": 0.102063,
    "crnn": 0.117181,
    "faresnet": 0.146333,
    "shake_faresnet": 0.148037,
    "avg_ensemble": 0.154609,
    "popularity": 0.031924,
}


def test_paper_table_published_figures_are_the_slides_and_deeper_resnets_have_none():
    rows = {row.config: row for row in paper_table.ROWS}
    assert {"resnet18", "resnet50"} <= set(rows)
    assert {name: row.slides_validation for name, row in rows.items() if row.slides_validation} == SLIDES_VALIDATION
    assert paper_table.published_figures(rows["cp_resnet"]) == {"PR-AUC-macro": 0.1325}
    for name in ("resnet18", "resnet50", "vggish"):
        assert paper_table.published_figures(rows[name]) is None and rows[name].slides_validation is None
    results = [
        {
            "row": rows[name].label,
            "config": name,
            "ours": {"PR-AUC-macro": 0.5, "ROC-AUC-macro": 0.75},
            "published": paper_table.published_figures(rows[name]),
            "published_validation": None if name == "resnet18" else {"PR-AUC-macro": rows[name].slides_validation},
            "seconds": 7.0,
        }
        for name in ("cp_resnet", "resnet18")
    ]
    table = paper_table.format_table(results, quick=True, seconds=14.0)
    assert "| CP_ResNet | cp_resnet | 0.5000 | 0.7500 | 0.1097 | 0.1325 | n/a | 7 |" in table
    assert "| ResNet-18 | resnet18 | 0.5000 | 0.7500 | n/a | n/a | n/a | 7 |" in table


@pytest.mark.skipif(
    not (reference_data.MEDIAEVAL2019 / "CP-JKU" / "results.tsv").is_file(),
    reason=f"the official results tables are not under {reference_data.MEDIAEVAL2019}",
)
def test_paper_table_published_test_figures_are_the_official_results():
    published = {row.config: paper_table.published_figures(row) for row in paper_table.ROWS}
    assert {name: figures["PR-AUC-macro"] for name, figures in published.items() if name in OFFICIAL_TEST} == (
        OFFICIAL_TEST
    )
    assert published["shake_faresnet"]["ROC-AUC-macro"] == 0.771685 and published["popularity"]["ROC-AUC-macro"] == 0.5


def test_train_step_benchmark_quick_times_both_frameworks_and_counts_flops():
    output = _run("benchmarks.train_step", "--quick", "--json")
    figures = json.loads(output[output.index("{") :])
    rows = {row["framework"]: row for row in figures["results"]}
    assert set(rows) == {"emorf_jax", "pytorch"}
    assert rows["emorf_jax"]["gflops_per_step"] > 0 and rows["pytorch"]["over_pytorch"] == 1.0
    assert rows["emorf_jax"]["mfu"] is None  # no known peak for a CPU


def test_step_profile_quick_puts_the_traced_step_time_in_groups(tmp_path):
    output = _run("benchmarks.step_profile", "--quick", "--json", "--trace_dir", str(tmp_path))
    figures = json.loads(output[output.index("{") :])
    groups = {row["group"]: row for row in figures["groups"]}
    assert groups["convolution"]["ms"] > 0 and figures["timed_ms"] > 0 and figures["step_wall_ms"] > 0
    assert sum(row["share"] for row in figures["groups"]) == pytest.approx(1.0)
    assert all(row["group"] in groups for row in figures["costliest"])
    assert list(tmp_path.rglob("*.xplane.pb")), "the trace is kept"


# An optimised GPU module's shape, written by hand: cuDNN's convolution as a custom call inside a fusion, a cuBLAS
# product, a BatchNorm reduction, the FA channel's concatenation, a transpose and a loop fusion.
_GPU_LIKE_HLO = """HloModule pmap_train_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%fused_reduce (param_0: f32[8,16]) -> f32[16] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.3 = f32[16]{0} reduce(%param_0, %constant.1), dimensions={0}, to_apply=%add
}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

%fused_transpose (param_0: f32[8,16]) -> f32[16,8] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  ROOT %transpose.2 = f32[16,8]{1,0} transpose(%param_0), dimensions={1,0}
}

%fused_concatenate (param_0: f32[8,16], param_1: f32[8,1]) -> f32[8,17] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %param_1 = f32[8,1]{1,0} parameter(1)
  ROOT %concatenate.4 = f32[8,17]{1,0} concatenate(%param_0, %param_1), dimensions={1}
}

%fused_convolution (param_0: bf16[8,16,4,4], param_1: bf16[3,3,16,16]) -> (bf16[8,16,4,4], u8[0]) {
  %param_0 = bf16[8,16,4,4]{3,2,1,0} parameter(0)
  %param_1 = bf16[3,3,16,16]{3,2,1,0} parameter(1)
  ROOT %cudnn-conv.1 = (bf16[8,16,4,4], u8[0]) custom-call(%param_0, %param_1), custom_call_target="__cudnn$convForward"
}

%fused_multiply (param_0: f32[8,16]) -> f32[8,16] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  ROOT %multiply.5 = f32[8,16]{1,0} multiply(%param_0, %param_0)
}

ENTRY %main.99 (Arg_0.1: f32[8,16], Arg_1.2: f32[8,1]) -> f32[16] {
  %Arg_0.1 = f32[8,16]{1,0} parameter(0)
  %Arg_1.2 = f32[8,1]{1,0} parameter(1)
  %convolution_fusion = (bf16[8,16,4,4], u8[0]) fusion(%Arg_0.1, %Arg_1.2), kind=kCustom, calls=%fused_convolution
  %cublas-gemm.7 = (f32[8,16]{1,0}, s8[0]{0}) custom-call(%Arg_0.1, %Arg_0.1), custom_call_target="__cublas$gemm"
  %concatenate_fusion = f32[8,17]{1,0} fusion(%Arg_0.1, %Arg_1.2), kind=kLoop, calls=%fused_concatenate
  %transpose_fusion = f32[16,8]{1,0} fusion(%Arg_0.1), kind=kInput, calls=%fused_transpose
  %loop_multiply_fusion = f32[8,16]{1,0} fusion(%Arg_0.1), kind=kLoop, calls=%fused_multiply
  %all-reduce.8 = f32[8,16]{1,0} all-reduce(%loop_multiply_fusion), replica_groups={}, to_apply=%add
  ROOT %input_reduce_fusion = f32[16]{0} fusion(%all-reduce.8), kind=kInput, calls=%fused_reduce
}
"""


def test_step_profile_groups_a_gpu_modules_operations_by_what_they_compute():
    expected = {
        "convolution_fusion": "convolution",
        "cublas-gemm.7": "matrix product",
        "concatenate_fusion": "concatenation",
        "transpose_fusion": "layout",
        "loop_multiply_fusion": step_profile.ELEMENTWISE,
        "all-reduce.8": "collective",
        "input_reduce_fusion": "reduction",
    }
    groups = step_profile.instruction_groups(_GPU_LIKE_HLO)
    assert {name: groups[name] for name in expected} == expected


def test_predict_benchmark_quick_times_decoding_features_and_models(tmp_path):
    output = _run("benchmarks.predict", "--quick", "--out", str(tmp_path))
    figures = json.loads(output[output.index("{") :])
    assert figures["audio_seconds"] == 6.0 and figures["windows"] >= 1
    for models in ("1_models", "2_models"):
        assert figures[models]["real_time_factor"] > 0


def test_onnx_tagging_benchmark_quick_gives_the_same_outputs_in_both_runtimes(tmp_path):
    output = _run("benchmarks.onnx_tagging", "--quick", "--out", str(tmp_path))
    figures = json.loads(output[output.index("{") :])
    assert figures["same_outputs_rtol_1e-4"] and figures["windows"] == 16 and figures["logit_scale"] > 0.1
    assert figures["jax"]["windows_per_second"] > 0 and figures["onnxruntime"]["windows_per_second"] > 0
    assert figures["file_mib"]["model.onnx"] > 0 and figures["onnx_export_seconds"] > 0


def test_tagging_command_benchmark_quick_times_the_command_its_int8_variant_and_another_tree():
    """The repository itself stands in for a checkout of another commit (`--baseline_tree`), which runs from there."""
    output = _run("benchmarks.tagging_command", "--quick", f"--baseline_tree={REPO}")
    figures = json.loads(output[output.index("{") :])
    assert figures["files"] == 3 and figures["audio_seconds"] == pytest.approx(15.0, abs=0.2)
    for variant in ("(defaults)", "--backend=onnxruntime --precision=int8", f"predict at {REPO}"):
        assert figures["variants"][variant]["wall_s"] > 0 and figures["variants"][variant]["peak_gib"] > 0.1


def test_int8_agreement_benchmark_quick_compares_each_setting_with_the_float_model():
    output = _run("benchmarks.int8_agreement", "--quick")
    figures = json.loads(output[output.index("\n{") + 1 :])
    assert figures["tracks"] == 24 and 0 < figures["test_tracks"] < 24 and 24 <= figures["calibration_windows"] <= 64
    assert len(figures["int8"]) == 2 and "| all, minmax, nearest rounding |" in output
    assert "| stage1_leading_3x3, minmax, gptq rounding |" in output  # the default
    for setting in figures["int8"].values():
        for part in ("all_tracks", "test_tracks"):
            assert 0.0 <= setting[part]["top5_set_unchanged"] <= 1.0 and setting[part]["largest_change"] >= 0.0
        assert 0.0 <= setting["pr_auc_macro"] <= 1.0


def test_fine_tuning_benchmark_quick_tables_every_condition(tmp_path):
    """Pretraining, the subsampled 50 % target data and the three conditions of one seed, at `:test` sizes: every row
    of the table with a finite PR-AUC in [0, 1] and a wall time, fewer training tracks than the target split has."""
    output = _run("benchmarks.fine_tuning", "--quick", "--out", str(tmp_path))
    figures = json.loads((tmp_path / "fine_tuning.json").read_text())
    rows = {(row["fraction"], row["condition"]): row for row in figures["rows"]}
    assert set(rows) == {(0.5, condition) for condition in ("fine-tuned", "from scratch", "linear probe")}
    for row in rows.values():
        assert 0.0 <= row["pr_auc_mean"] <= 1.0 and row["pr_auc_sd"] == 0.0 and row["seconds_mean"] >= 0.0
        assert 0 < row["train_tracks"] < figures["target"]["train_tracks"]
    assert 0.0 <= figures["pretrain"]["PR-AUC-macro"] <= 1.0
    table = (tmp_path / "fine_tuning.md").read_text()
    assert table.strip() in output and "| 50 % (" in table


def test_limits_benchmark_quick_states_each_work_as_a_fraction_of_the_measured_limit():
    output = _run("benchmarks.limits", "--quick")
    assert "| work | achieved | limit | fraction |" in output
    figures = json.loads(output[output.index("\n{") + 1 :])
    assert figures["cpu"]["cores"] >= 1 and figures["limit_gflops_per_s"] > 0
    assert {kernel["dtype"] for kernel in figures["kernels"]} == {"float32", "bfloat16", "uint8 x int8"}
    assert all(kernel["gflops_per_s"] > 0 for kernel in figures["kernels"])
    assert [row["unit"] for row in figures["work"]] == ["GFLOP/s"] * 3 + ["audio s per CPU s"]
    for row in figures["work"]:
        assert row["achieved"] > 0 and row["limit"] > 0 and 0 < row["fraction"] <= 1.5
    preparation = figures["data_preparation"]
    assert preparation["audio_seconds"] == pytest.approx(10.0, abs=0.1)
    floor = preparation["floor_audio_s_per_cpu_s"]  # decode and FFT together: slower than either alone
    assert 0 < floor < min(preparation["decode_audio_s_per_cpu_s"], preparation["fft_audio_s_per_cpu_s"])
