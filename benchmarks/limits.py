"""Know the limit: this machine's attainable throughput with the project's libraries, and our work as a fraction of it.

    python -m benchmarks.limits                      # paper sizes; times the train step and the tagging forward
    python -m benchmarks.limits --train_step_s 10.0 --tagging_windows_per_s 2.5   # achieved rates measured elsewhere
    python -m benchmarks.limits --quick              # tiny sizes, for CI: the script cannot rot

Attainable compute: wall seconds of large kernels on every core the process may run on (XLA's thread pool, BLAS and
onnxruntime's intra-op threads alike): a square float32 matrix product (`jax.jit`, numpy's BLAS, an onnxruntime
MatMul), a float32 3x3 128->128 convolution of an (8, 128, 64, 430) NCHW input (`jax.lax.conv_general_dilated` in
NHWC as our models run it, and a one-node onnxruntime Conv), a bfloat16 matrix product in JAX and an int8 one in
onnxruntime (MatMulInteger), with whether the CPU has native bfloat16 and VNNI. The limit that our work is divided by
is the best float32 rate measured (our work is float32). The theoretical float32 peak from the CPU's flags and
/proc/cpuinfo's clock is printed beside it as an estimate only: a virtual machine's "cpu MHz" is often the base
clock, which the cores exceed when they boost, so a measured rate can pass it.

Every time below is the fastest of its timed calls: on a shared machine, the one least lengthened by other jobs.

Our work: the FLOPs of one training step of the paper's FA-ResNet (ρ=5, width 128, 256 x 431 input, batch 16; the
count of `benchmarks.train_step`) and of one 20-s tagging window (its forward on 256 x 1722), both from XLA's cost
analysis of the program lowered with XLA's own convolutions (the analysis counts a loop body once, and the model's
CPU kernel gradient loops). Achieved GFLOP/s = FLOPs / seconds: the step is timed (`--train_steps`) unless
`--train_step_s` is given; the tagging window at batch 2 (`--tagging_calls`) through JAX's jitted forward and through
the exported ONNX model in onnxruntime, the CPU default (whose rate `--tagging_windows_per_s` may give instead).

Data preparation's floor, on one thread, in audio seconds per CPU second of a real-length MP3 (`--mp3`; a
synthetic 4-min track if none is given): decoding alone (libsndfile, `data_prep.features.AudioFile`), the
FFT alone (`scipy.fft.rfft` of the float32 2048-sample frames at hop 512, workers=1), and the whole feature
computation as data preparation runs it (`FileFeatures`, hop512, decoding included). The floor is decode + FFT.

Prints a markdown table (work | achieved | limit | fraction), the kernels' rates, then everything as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.fft
import threadpoolctl

from benchmarks import train_step
from benchmarks.tagging_inputs import NUM_TAGS, save_checkpoint, write_track
from data_prep import features

# x86 cores since Haswell and Zen issue two vector FMAs per cycle; each FMA is two FLOPs.
FMA_UNITS = 2
FLOPS_PER_FMA = 2
FLOAT32_LANES = {"avx512f": 16, "avx2": 8}
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
# The one-node graphs' opset and IR version: old enough for any onnxruntime the plain install accepts.
ONNX_OPSET = 17
ONNX_IR_VERSION = 9
# Frames transformed per FFT call: a cache-sized batch, the fastest of 64 to 4,096 on a 2-core EPYC.
FFT_BLOCK_FRAMES = 256
# Windows per timed forward call: small, so that a paper-width call takes about a second on two cores.
TAGGING_BATCH = 2


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The kernels' and the model's shapes: the paper's, or tiny ones for a quick run."""

    matmul: int
    conv_nchw: tuple[int, int, int, int]
    mel_bins: int
    train_frames: int
    batch_size: int
    window_frames: int
    base_channels: int
    synthetic_seconds: float


# The paper's: its input (256 mels x 431 frames) at batch 16, its 20-s tagging window, a 4-min synthetic track.
PAPER = Sizes(4096, (8, 128, 64, 430), 256, 431, 16, 1722, 128, 240.0)
QUICK = Sizes(256, (1, 16, 32, 64), *train_step.SIZES["tiny"], 2, 64, 4, 10.0)


@dataclasses.dataclass(frozen=True)
class Cpu:
    """What /proc/cpuinfo says about the cores that bound our throughput."""

    model: str
    mhz: float | None
    flags: frozenset[str]
    cores: int

    @property
    def native_bfloat16(self) -> bool:
        return any(flag in self.flags for flag in BFLOAT16_FLAGS)

    @property
    def vnni(self) -> bool:
        return any(flag in self.flags for flag in VNNI_FLAGS)

    @property
    def float32_lanes(self) -> int | None:
        if "fma" not in self.flags:
            return None
        return next((lanes for flag, lanes in FLOAT32_LANES.items() if flag in self.flags), None)

    @property
    def peak_gflops_estimate(self) -> float | None:
        """lanes x FMA units x 2 FLOPs x cores x clock: an upper bound to compare with, not a measured rate (the
        clock varies, and two usable CPUs may be hyperthreads of one core)."""
        if self.float32_lanes is None or self.mhz is None:
            return None
        return self.float32_lanes * FMA_UNITS * FLOPS_PER_FMA * self.cores * self.mhz / 1e3


def read_cpu(cores: int) -> Cpu:
    """The first processor's model, clock and flags; empty where /proc/cpuinfo is missing (not Linux)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    mhz = fields.get("cpu MHz")
    return Cpu(
        fields.get("model name", "unknown"),
        float(mhz) if mhz else None,
        frozenset(fields.get("flags", "").split()),
        cores,
    )


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One timed kernel: `gflop` of work per call, in the seconds of its fastest timed call."""

    name: str
    library: str
    dtype: str
    shape: str
    gflop: float
    seconds: float

    @property
    def gflops_per_s(self) -> float:
        return self.gflop / self.seconds


def fastest(run: Callable[[], object], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds by `clock` of the fastest of `repeats` calls of `run`: the attainable time, which another job on a shared
    machine can only lengthen (wall time), or this process's CPU time (`time.process_time`), which on one thread
    those jobs do not inflate."""
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return min(times)


def fastest_seconds(run: Callable[[], object], repeats: int) -> float:
    """Wall seconds of the fastest of `repeats` calls of `run` after one untimed call (which compiles or allocates)."""
    run()
    return fastest(run, repeats)


def onnx_session(nodes: list, inputs: list, output: object, initializers: list, threads: int):
    """An onnxruntime CPU session of a hand-written graph, `threads` intra-op threads as our tagging runs it."""
    import onnx
    import onnxruntime
    from onnx import helper

    graph = helper.make_graph(nodes, "kernel", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def matmul_kernels(n: int, threads: int, repeats: int) -> list[Kernel]:
    """float32 n x n products in JAX, numpy's BLAS and onnxruntime; bfloat16 in JAX; int8 in onnxruntime."""
    import jax
    import jax.numpy as jnp
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    left, right = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    gflop = 2 * n**3 / 1e9
    shape = f"{n}x{n} @ {n}x{n}"
    product = jax.jit(jnp.matmul)
    kernels = []
    for dtype in (jnp.float32, jnp.bfloat16):
        a, b = jnp.asarray(left, dtype), jnp.asarray(right, dtype)
        seconds = fastest_seconds(lambda a=a, b=b: product(a, b).block_until_ready(), repeats)
        kernels.append(Kernel("matmul", "jax.jit", jnp.dtype(dtype).name, shape, gflop, seconds))
    with threadpoolctl.threadpool_limits(limits=threads):
        kernels.append(
            Kernel("matmul", "numpy (BLAS)", "float32", shape, gflop, fastest_seconds(lambda: left @ right, repeats))
        )

    session = onnx_session(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n]),
        [numpy_helper.from_array(right, "b")],
        threads,
    )
    seconds = fastest_seconds(lambda: session.run(None, {"a": left}), repeats)
    kernels.append(Kernel("matmul", "onnxruntime", "float32", shape, gflop, seconds))

    quantised = rng.integers(0, 256, (n, n), dtype=np.uint8)
    session = onnx_session(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])],
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        helper.make_tensor_value_info("c", TensorProto.INT32, [n, n]),
        [numpy_helper.from_array(rng.integers(-128, 128, (n, n), dtype=np.int8), "b")],
        threads,
    )
    seconds = fastest_seconds(lambda: session.run(None, {"a": quantised}), repeats)
    kernels.append(Kernel("matmul", "onnxruntime MatMulInteger", "uint8 x int8", shape, gflop, seconds))
    return kernels


def conv_kernels(nchw: tuple[int, int, int, int], threads: int, repeats: int) -> list[Kernel]:
    """A 3x3 same-padded convolution with as many output as input channels, the shape of our wide layers: JAX in
    NHWC (as the models run), onnxruntime in NCHW (as the exported models run)."""
    import jax
    from onnx import TensorProto, helper, numpy_helper

    batch, channels, height, width = nchw
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal(nchw, dtype=np.float32)
    kernel_oihw = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32) / (9 * channels) ** 0.5
    gflop = 2 * batch * height * width * channels * channels * 9 / 1e9
    shape = f"3x3 {channels}->{channels} on {batch}x{channels}x{height}x{width}"

    convolve = jax.jit(
        lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    )
    x_nhwc = jax.numpy.asarray(inputs.transpose(0, 2, 3, 1))
    kernel_hwio = jax.numpy.asarray(kernel_oihw.transpose(2, 3, 1, 0))
    seconds = fastest_seconds(lambda: convolve(x_nhwc, kernel_hwio).block_until_ready(), repeats)
    kernels = [Kernel("conv", "jax.lax (NHWC)", "float32", shape, gflop, seconds)]

    session = onnx_session(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(nchw))],
        helper.make_tensor_value_info("y", TensorProto.FLOAT, list(nchw)),
        [numpy_helper.from_array(kernel_oihw, "w")],
        threads,
    )
    seconds = fastest_seconds(lambda: session.run(None, {"x": inputs}), repeats)
    kernels.append(Kernel("conv", "onnxruntime (NCHW)", "float32", shape, gflop, seconds))
    return kernels


def model_fields(base_channels: int) -> dict:
    """The paper's FA-ResNet (ρ=5, no shake-shake, no feature shift) at `base_channels`."""
    return {
        "name": "cp_resnet",
        "num_classes": NUM_TAGS,
        "rho": train_step.RHO,
        "base_channels": base_channels,
        "frequency_aware": True,
        "shake_shake": False,
        "features_shift": False,
    }


def train_step_work(sizes: Sizes, given_seconds: float | None, steps: int) -> dict:
    """FLOPs of one training step (`train_step.jax_contender`'s count, which compiles the step) and its seconds:
    `given_seconds`, or the fastest of `steps` timed steps after one untimed."""
    setup = train_step.Setup(sizes.mel_bins, sizes.train_frames, sizes.batch_size, sizes.base_channels)
    contender = train_step.jax_contender(setup, warmup=0 if given_seconds else 1)
    if given_seconds:
        seconds, source = given_seconds, "given"
    else:
        seconds = min(train_step.measure([contender], 1, steps)[contender.framework])
        source = f"fastest of {steps} steps"
    return {
        "work": f"training step, FA-ResNet width {sizes.base_channels}, batch {sizes.batch_size} of "
        f"{sizes.mel_bins}x{sizes.train_frames}",
        "gflop": contender.flops_per_step / 1e9,
        "seconds": seconds,
        "seconds_source": source,
        "compile_seconds": contender.prepare_seconds,
    }


def tagging_work(sizes: Sizes, given_windows_per_s: float | None, calls: int, scratch: Path) -> list[dict]:
    """FLOPs of one tagging window's forward (lowered with XLA's convolutions, not run) and the windows per second of
    each backend: JAX's jitted forward and the exported ONNX model in onnxruntime (the CPU default), each timed over
    `calls` calls at batch `TAGGING_BATCH`; `given_windows_per_s` replaces the default backend's."""
    import jax
    import onnxruntime

    from emorf_jax import export
    from emorf_jax.models import registry

    mels = features.settings_for("hop512").n_mels  # the checkpoint's feature setting, whatever the training sizes
    model = registry.build(model_fields(sizes.base_channels))
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, mels, 64, 1), np.float32))
    window = jax.ShapeDtypeStruct((1, mels, sizes.window_frames, 1), np.float32)
    flops = train_step.compiled_flops(jax.jit(model.clone(fast_cpu_conv=False).apply).lower(variables, window))
    forward = jax.jit(model.apply)
    batch = np.random.default_rng(0).standard_normal((TAGGING_BATCH, *window.shape[1:]), dtype=np.float32)
    jax_seconds = fastest_seconds(lambda: forward(variables, batch).block_until_ready(), calls)
    checkpoint = save_checkpoint(scratch / "checkpoint", sizes.base_channels, sizes.window_frames)
    session = onnxruntime.InferenceSession(
        str(export.cached_onnx(checkpoint, scratch)), providers=["CPUExecutionProvider"]
    )
    stored = np.random.default_rng(0).normal(-30.0, 20.0, (TAGGING_BATCH, sizes.window_frames, mels))
    stored = stored.astype(np.float16)
    onnx_seconds = fastest_seconds(lambda: session.run(None, {export.INPUT_NAME: stored}), calls)
    if given_windows_per_s:
        onnx_seconds, source = 1 / given_windows_per_s, "given"
    else:
        source = f"fastest of {calls} calls at batch {TAGGING_BATCH}"
    label = f"tagging window, FA-ResNet width {sizes.base_channels}, {mels}x{sizes.window_frames}"
    return [
        {
            "work": f"{label}, onnxruntime (the CPU default)",
            "gflop": flops / 1e9,
            "seconds": onnx_seconds / TAGGING_BATCH,
            "seconds_source": source,
        },
        {
            "work": f"{label}, JAX",
            "gflop": flops / 1e9,
            "seconds": jax_seconds / TAGGING_BATCH,
            "seconds_source": f"fastest of {calls} calls at batch {TAGGING_BATCH}",
        },
    ]


def decode(path: Path) -> None:
    """A whole decode as data preparation's decoder runs it, block by block, each block dropped as the next comes."""
    with features.AudioFile(path, path.name) as audio:
        for _ in audio.blocks():
            pass


def decoded_mono(path: Path) -> tuple[np.ndarray, int]:
    """The mono mix float32 of the whole decode, and its sample rate: what the features' frames are cut from."""
    with features.AudioFile(path, path.name) as audio:
        return np.concatenate([features.to_mono(block) for block in audio.blocks()]), audio.sample_rate


def fft_cpu_seconds(mono: np.ndarray, n_fft: int, hop: int) -> float:
    """CPU seconds of the real FFTs alone of a track's frames (reflect-padded as the features frame it), on one
    worker; the frames are copied out before each block is timed."""
    padded = np.pad(mono, n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    total = 0.0
    for first in range(0, len(frames), FFT_BLOCK_FRAMES):
        block = np.ascontiguousarray(frames[first : first + FFT_BLOCK_FRAMES])
        start = time.process_time()
        scipy.fft.rfft(block, axis=-1, workers=1)
        total += time.process_time() - start
    return total


def whole_features(path: Path, settings: features.FeatureSettings) -> None:
    """A track's features computed as data preparation's extraction computes them."""
    with features.AudioFile(path, path.name) as audio:
        computed = features.FileFeatures(audio, settings)
        computed.measure()
        for _ in computed.blocks():
            pass


def data_preparation(path: Path, repeats: int) -> dict:
    """Decode, FFT and the whole features of one track in audio seconds per CPU second, on one thread as each data
    preparation worker runs."""
    settings = features.settings_for("hop512")
    with threadpoolctl.threadpool_limits(limits=1):
        mono, sample_rate = decoded_mono(path)
        audio_seconds = len(mono) / sample_rate
        whole_features(path, settings)  # the filter banks' one-off cost is not timed
        decode_seconds = fastest(lambda: decode(path), repeats, time.process_time)
        fft_seconds = min(fft_cpu_seconds(mono, settings.n_fft, settings.hop_length) for _ in range(repeats))
        features_seconds = fastest(lambda: whole_features(path, settings), repeats, time.process_time)
    return {
        "track": str(path),
        "audio_seconds": round(audio_seconds, 2),
        "decode_audio_s_per_cpu_s": audio_seconds / decode_seconds,
        "fft_audio_s_per_cpu_s": audio_seconds / fft_seconds,
        "floor_audio_s_per_cpu_s": audio_seconds / (decode_seconds + fft_seconds),
        "features_audio_s_per_cpu_s": audio_seconds / features_seconds,
    }


def track_path(requested: str | None, scratch: Path, synthetic_seconds: float) -> Path:
    """The MP3 to prepare: the one asked for, else a synthetic track written for the run."""
    if requested:
        return Path(requested)
    path = scratch / "synthetic.mp3"
    write_track(path, synthetic_seconds)
    return path


def work_rows(model_work: list[dict], limit: Kernel, preparation: dict) -> list[dict]:
    """Each piece of our work: achieved rate, its limit and the fraction of it."""
    rows = []
    for work in model_work:
        achieved = work["gflop"] / work["seconds"]
        rows.append(
            {
                **work,
                "unit": "GFLOP/s",
                "achieved": achieved,
                "limit": limit.gflops_per_s,
                "limit_source": f"{limit.name}, {limit.library}",
                "fraction": achieved / limit.gflops_per_s,
            }
        )
    achieved, floor = preparation["features_audio_s_per_cpu_s"], preparation["floor_audio_s_per_cpu_s"]
    rows.append(
        {
            "work": "data preparation, hop512 features of one MP3, one thread",
            "unit": "audio s per CPU s",
            "achieved": achieved,
            "limit": floor,
            "limit_source": "decode + FFT",
            "fraction": achieved / floor,
        }
    )
    return rows


def work_label(row: dict) -> str:
    """The work's name with its FLOPs, which make its rate checkable by hand."""
    return f"{row['work']} ({row['gflop']:.4g} GFLOP)" if "gflop" in row else row["work"]


def format_tables(cpu: Cpu, kernels: list[Kernel], rows: list[dict]) -> str:
    """Markdown, ready for benchmarks/RESULTS.md: our work against its limit, then the kernels behind the limit."""
    peak = cpu.peak_gflops_estimate
    if peak:
        peak_line = (
            f"float32 peak ESTIMATE {peak:.0f} GFLOP/s ({cpu.float32_lanes} lanes x {FMA_UNITS} FMA units assumed x "
            f"{FLOPS_PER_FMA} FLOP x {cpu.cores} cores x {cpu.mhz:.0f} MHz)"
        )
    else:
        peak_line = "no float32 peak estimate (no FMA flags or clock in /proc/cpuinfo)"
    lines = [
        "| work | achieved | limit | fraction |",
        "| --- | --- | --- | --- |",
        *(
            f"| {work_label(row)} | {row['achieved']:.4g} {row['unit']} | {row['limit']:.4g} {row['unit']} "
            f"({row['limit_source']}) | {row['fraction']:.1%} |"
            for row in rows
        ),
        "",
        "| kernel | library | dtype | shape | GFLOP/s (int8: GOP/s) | of the float32 peak ESTIMATE |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {k.name} | {k.library} | {k.dtype} | {k.shape} | {k.gflops_per_s:.1f} | "
            f"{f'{k.gflops_per_s / peak:.1%}' if peak and k.dtype == 'float32' else 'n/a'} |"
            for k in kernels
        ),
        "",
        f"{cpu.model}, {cpu.cores} usable cores; {peak_line}; "
        f"{'native bf16' if cpu.native_bfloat16 else 'no native bf16'}; {'VNNI' if cpu.vnni else 'no VNNI'}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.limits", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train_step_s", type=float, help="seconds per training step measured elsewhere")
    parser.add_argument("--tagging_windows_per_s", type=float, help="tagging windows per second measured elsewhere")
    parser.add_argument("--train_steps", type=int, default=2, help="timed steps when --train_step_s is not given")
    parser.add_argument("--tagging_calls", type=int, default=3, help="timed forward calls without the rate given")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each kernel and data preparation stage")
    parser.add_argument("--mp3", help="the track data preparation is timed on (default: see above)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a 10-s synthetic track, for CI")
    args = parser.parse_args(argv)
    for name in ("train_step_s", "tagging_windows_per_s"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("train_steps", "tagging_calls", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.quick:
        args.train_steps, args.tagging_calls, args.repeats = 1, 1, 1
    return args


def versions() -> dict[str, str]:
    """The libraries whose kernels were timed: their versions change the limit."""
    import onnxruntime
    import scipy

    return {
        **train_step.versions(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = QUICK if args.quick else PAPER
    train_step.select_jax_platform("cpu")
    cpu = read_cpu(train_step.usable_cores())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="emorf_limits_") as scratch:
        preparation = data_preparation(track_path(args.mp3, Path(scratch), sizes.synthetic_seconds), args.repeats)
        kernels = matmul_kernels(sizes.matmul, cpu.cores, args.repeats) + conv_kernels(
            sizes.conv_nchw, cpu.cores, args.repeats
        )
        limit = max((k for k in kernels if k.dtype == "float32"), key=lambda k: k.gflops_per_s)
        model_work = [
            train_step_work(sizes, args.train_step_s, args.train_steps),
            *tagging_work(sizes, args.tagging_windows_per_s, args.tagging_calls, Path(scratch)),
        ]
    rows = work_rows(model_work, limit, preparation)
    dump = {
        "cpu": {
            "model": cpu.model,
            "cores": cpu.cores,
            "mhz": cpu.mhz,
            "float32_peak_gflops_estimate": cpu.peak_gflops_estimate,
            "native_bfloat16": cpu.native_bfloat16,
            "vnni": cpu.vnni,
        },
        "kernels": [{**dataclasses.asdict(k), "gflops_per_s": k.gflops_per_s} for k in kernels],
        "limit_gflops_per_s": limit.gflops_per_s,
        "work": rows,
        "data_preparation": preparation,
        "context": {
            "command": " ".join(["python -m benchmarks.limits", *(sys.argv[1:] if argv is None else argv)]),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "versions": versions(),
        },
    }
    print(format_tables(cpu, kernels, rows))
    print(json.dumps(dump, indent=1))


if __name__ == "__main__":
    main()
