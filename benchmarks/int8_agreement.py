"""What int8 changes in a trained model's tags: each int8 setting against the float model, over every track of a folder,
and the test split's PR-AUC.

    python -m benchmarks.int8_agreement --workdir=runs/demo     # the demo's SWA model over its synthetic tracks
    python -m benchmarks.int8_agreement --quick    # tiny synthetic tracks, random kernels: the script cannot rot

The float reference is the checkpoint's exported ONNX model (`export.cached_onnx`), whose outputs are the JAX path's
within float32 rounding. Each int8 setting (`export.quantize_onnx`'s scope, calibration method and weight rounding)
quantises that model with the calibration `predict --precision=int8` uses: the first windows of the folder's files
(`tagger.calibration_windows`, 64 windows, at most 4 per file). Every track is tagged by the float model and each int8
copy through the same `Tagger`; the table gives, per setting, the share of tracks whose top tag and whose top-5 set
are unchanged, the largest and mean change of a probability, and the test split's PR-AUC-macro and ROC-AUC-macro
(`metrics.mediaeval_metrics`, labels from the run's split-0 TSVs in the checkpoint's tag order).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.tagging_inputs import save_checkpoint
from data_prep import metadata
from data_prep import synthetic as synthetic_tracks
from emorf_jax import checkpoints, export, metrics, tagger, track_features
from emorf_jax.models import registry

SETTINGS = [  # (scope, method, reduce_range, rounding)
    ("all", "minmax", False, "nearest"),
    ("all", "minmax", True, "nearest"),
    ("convolutions", "minmax", True, "nearest"),
    ("stage1_convolutions", "minmax", False, "nearest"),
    ("stage1_convolutions", "minmax", False, "gptq"),
    ("stage1_leading_3x3", "minmax", False, "nearest"),
    ("stage1_leading_3x3", "minmax", False, "gptq"),
]
TOP_K = 5


def tag_folder(model: tagger.Tagger, files: list[Path]) -> np.ndarray:
    """(files, tags) probabilities of every file."""
    return np.stack([model.tag_file(path).probabilities for path in files])


def onnx_tagger(checkpoint: str, onnx_model: Path) -> tagger.Tagger:
    """A one-member Tagger whose windows run through `onnx_model`."""
    import onnxruntime

    variables, meta = checkpoints.load_checkpoint(checkpoint)
    session = onnxruntime.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    member = tagger.Member(registry.build(meta["model"]), variables, meta, session)
    return tagger.Tagger((member,), tagger.default_batch_size("onnxruntime"))


def agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Shares of rows whose top tag and top-5 set are the same, and the largest and mean probability change."""
    top_k = min(TOP_K, reference.shape[1])
    same_top5 = [
        set(np.argsort(-a)[:top_k]) == set(np.argsort(-b)[:top_k]) for a, b in zip(reference, other, strict=True)
    ]
    change = np.abs(reference - other)
    return {
        "top1_unchanged": float(np.mean(reference.argmax(1) == other.argmax(1))),
        "top5_set_unchanged": float(np.mean(same_top5)),
        "largest_change": float(change.max()),
        "mean_change": float(change.mean()),
    }


def scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    figures = metrics.mediaeval_metrics(labels, probabilities)
    return {"pr_auc_macro": float(figures["PR-AUC-macro"]), "roc_auc_macro": float(figures["ROC-AUC-macro"])}


def measure(checkpoint: str, audio_dir: Path, metadata_dir: Path, settings: list[tuple[str, str, bool, str]]) -> dict:
    meta = checkpoints.load_checkpoint(checkpoint)[1]
    files = tagger.audio_files([str(audio_dir)])
    test = metadata.read_tracks(metadata.split_tsv_path(metadata_dir, 0, "test"))
    row_of = {str(path.relative_to(audio_dir)): index for index, path in enumerate(files)}
    test_rows = [row_of[track.path] for track in test]
    labels = np.stack([metadata.multi_hot(track.tags, meta["tags"]) for track in test])

    float_model = export.cached_onnx(checkpoint)
    reference = tag_folder(onnx_tagger(checkpoint, float_model), files)
    audio_settings = track_features.audio_settings(meta["features"])
    windows = tagger.calibration_windows([str(path) for path in files], audio_settings, int(meta["window_frames"]))
    results = {
        "tracks": len(files),
        "test_tracks": len(test_rows),
        "calibration_windows": len(windows),
        "float32": scores(labels, reference[test_rows]),
        "int8": {},
    }
    with tempfile.TemporaryDirectory(prefix="emorf_int8_") as work:
        for scope, method, reduce_range, rounding in settings:
            name = f"{scope}, {method}" + (", 7-bit weights" if reduce_range else "") + f", {rounding} rounding"
            start = time.perf_counter()
            output = Path(work) / f"{scope}-{method}-{reduce_range}-{rounding}.onnx"
            quantized = export.quantize_onnx(float_model, windows, output, scope, method, reduce_range, rounding)
            seconds = time.perf_counter() - start
            probabilities = tag_folder(onnx_tagger(checkpoint, quantized), files)
            results["int8"][name] = {
                "all_tracks": agreement(reference, probabilities),
                "test_tracks": agreement(reference[test_rows], probabilities[test_rows]),
                **scores(labels, probabilities[test_rows]),
                "quantise_s": round(seconds, 1),
            }
    return results


def table(results: dict) -> str:
    lines = [
        "| int8 setting (scope, calibration, rounding) | top-1 unchanged | top-5 set unchanged (all / test) "
        "| largest change | mean change | test PR-AUC-macro (float32 {:.4f}) |".format(
            results["float32"]["pr_auc_macro"]
        ),
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, figures in results["int8"].items():
        every, test = figures["all_tracks"], figures["test_tracks"]
        lines.append(
            f"| {name} | {every['top1_unchanged']:.1%} | {every['top5_set_unchanged']:.1%} / "
            f"{test['top5_set_unchanged']:.1%} | {every['largest_change']:.4f} | {every['mean_change']:.4f} | "
            f"{figures['pr_auc_macro']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.int8_agreement",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", help="a finished demo run (its swa checkpoint and synthetic/ tree)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and two settings, for CI")
    args = parser.parse_args()
    settings = SETTINGS
    with tempfile.TemporaryDirectory(prefix="emorf_int8_run_") as scratch:
        if args.quick:
            args.workdir = scratch
            synthetic = [sys.executable, "-m", "data_prep.synthetic", f"--out={scratch}/synthetic", "--tracks=24"]
            subprocess.run([*synthetic, "--duration=3", "--workers=1"], check=True, capture_output=True)
            save_checkpoint(Path(scratch), 4, 172, synthetic_tracks.label_tags())
            settings = [SETTINGS[0], SETTINGS[-1]]  # every operator, and the default
        elif not args.workdir:
            parser.error("give --workdir (a finished demo run) or --quick")
        workdir = Path(args.workdir)
        results = measure(
            str(workdir / checkpoints.SWA),
            workdir / "synthetic" / "audio",
            workdir / "synthetic" / "data",
            settings,
        )
    print(table(results))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
