"""ONNX Runtime against the JAX path on CPU: the model over a whole track's 20-s windows, same windows, same outputs.

    python -m benchmarks.onnx_tagging                # the paper's FA-ResNet (ρ=5, width 128, 56 tags), a 5-min track
    python -m benchmarks.onnx_tagging --quick        # tiny sizes, for CI: the script cannot rot

Saves a randomly initialised checkpoint as a run writes it (kernels drawn N(0, 1/fan_in), so that the logits compared
are not the zero-initialised head's constants), exports it (`emorf_jax.export`, both formats: time and file sizes),
then runs the same stored float16 windows (`windowing.window_ranges` of a random track) through
`tagger.Tagger.window_logits` (JAX: batches of 8, the last padded to a power of two, compiled before timing) and
through the ONNX model in onnxruntime (batches of 8, float16 input, normalised inside). The process is pinned to
`--threads` cores, on which XLA runs its thread pool, and onnxruntime gets as many intra-op threads. Prints windows/s,
the real-time factor (audio seconds per wall second of the model alone, median of `--repeats`) and the largest
difference of the outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.tagging_inputs import save_checkpoint
from data_prep import features
from emorf_jax import checkpoints, export, windowing
from emorf_jax.models import registry
from emorf_jax.tagger import Member, Tagger

BATCH_SIZE = 8


def _median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(checkpoint: str, out: Path, seconds: float, threads: int, repeats: int) -> dict:
    import onnxruntime

    start = time.perf_counter()
    onnx_path = export.export_onnx(checkpoint, out / "model.onnx")
    export_seconds = time.perf_counter() - start
    start = time.perf_counter()
    torch_paths = export.export_torch(checkpoint, out / "model.pt")
    torch_seconds = time.perf_counter() - start

    variables, meta = checkpoints.load_checkpoint(checkpoint)
    tagger = Tagger((Member(registry.build(meta["model"]), variables, meta),), BATCH_SIZE)
    settings = features.FeatureSettings(**meta["features"])
    frames = round(seconds * settings.sample_rate / settings.hop_length)
    rng = np.random.default_rng(1)
    spectrogram = rng.normal(-30.0, 20.0, (settings.n_mels, frames)).astype(np.float16)  # (n_mels, frames)
    windows = windowing.window_ranges(frames, tagger.window_frames)
    stored = spectrogram.T  # time-major, as the shards store it

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def onnx_logits() -> np.ndarray:
        batches = []
        for first in range(0, len(windows), BATCH_SIZE):
            group = np.stack([stored[a:b] for a, b, _ in windows[first : first + BATCH_SIZE]])
            batches.append(session.run(None, {export.INPUT_NAME: group})[0])
        return np.concatenate(batches)

    compile_start = time.perf_counter()
    jax_out = tagger.window_logits(spectrogram)[0][0]  # compiles the batch shapes the track runs in
    compile_seconds = time.perf_counter() - compile_start
    onnx_out = onnx_logits()  # onnxruntime's first run allocates its buffers
    scale = np.abs(jax_out).max()
    same = bool(np.allclose(onnx_out, jax_out, rtol=1e-4, atol=1e-4 * scale))
    figures = {
        "audio_seconds": seconds,
        "windows": len(windows),
        "window_frames": tagger.window_frames,
        "threads": threads,
        "onnx_export_seconds": round(export_seconds, 1),
        "torch_export_seconds": round(torch_seconds, 1),
        "file_mib": {path.name: round(path.stat().st_size / 2**20, 2) for path in [onnx_path, *torch_paths]},
        "jax_compile_seconds": round(compile_seconds, 1),
        "max_abs_difference": float(np.abs(onnx_out - jax_out).max()),
        "logit_scale": float(scale),
        "same_outputs_rtol_1e-4": same,
    }
    for name, run in (("jax", lambda: tagger.window_logits(spectrogram)), ("onnxruntime", onnx_logits)):
        model_seconds = _median_seconds(run, repeats)
        figures[name] = {
            "model_seconds": round(model_seconds, 3),
            "windows_per_second": round(len(windows) / model_seconds, 2),
            "real_time_factor": round(seconds / model_seconds, 1),
        }
    figures["onnxruntime_over_jax"] = round(
        figures["onnxruntime"]["windows_per_second"] / figures["jax"]["windows_per_second"], 2
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.onnx_tagging",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the track (300 s: 25,840 frames)")
    parser.add_argument("--base_channels", type=int, default=128)
    parser.add_argument("--window_frames", type=int, default=1722, help="the 20-s evaluation window")
    parser.add_argument("--threads", type=int, default=2, help="cores the process is pinned to; onnxruntime threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each runtime (median)")
    parser.add_argument("--out", default="/tmp/bench_onnx_tagging", help="where the checkpoint and exports go")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.base_channels, args.window_frames, args.repeats = 30.0, 4, 172, 1
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    out = Path(args.out) / f"width{args.base_channels}_window{args.window_frames}"
    checkpoint = out / "checkpoint" / checkpoints.SWA
    if not checkpoint.exists():
        save_checkpoint(out / "checkpoint", args.base_channels, args.window_frames)
    figures = measure(str(checkpoint), out, args.seconds, args.threads, args.repeats)
    figures["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
