"""Training throughput of one optimiser step: emorf_jax's pmapped train step against the authors' PyTorch CP-ResNet.

    python -m benchmarks.train_step --size small
    python -m benchmarks.train_step --size paper --batch_size 8,16 --convs fast,xla --steps 2 --warmup 1 --repeats 3
    python -m benchmarks.train_step --device gpu --batch_size 64 --half_precision --frameworks jax
    python -m benchmarks.train_step --quick      # tiny sizes, for CI: the script cannot rot

Both sides run a full step of the FA CP-ResNet (ρ=5) on the same batch shape: forward, backward, Adam update and
BatchNorm update (emorf_jax's step also normalises its float16 stored-format crops, as in training, and updates its
SWA average; mixup is off). emorf_jax is timed through `train.train_step` under `jax.pmap(axis_name="batch")` on one
device, compiled ahead of time so that compile seconds are reported apart, with the model built the default way
(`--convs fast`: on CPU, convolution gradients as matrix products, models/conv.py) and/or with XLA's own
convolutions (`--convs xla`); on a GPU both are XLA's. PyTorch is
`tests/torch_reference.TorchCPResNet` (the authors' architecture) in float32 with `torch.optim.Adam` and
`BCEWithLogitsLoss` in train mode, on as many threads as this process may use (XLA's CPU thread pool uses them all).
Repetitions of all contenders alternate, so that the load of a shared machine falls on all alike; the medians are
reported, per step and per example, with the ratio of each emorf_jax contender's examples/s to PyTorch's.
emorf_jax's FLOPs per step come from XLA's cost analysis of the compiled step; the model FLOP utilisation (MFU) is
printed where the device's peak is known (`PEAK_TFLOPS`). Run it from the repository root as a module (it imports
`tests`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

NUM_TAGS = 56
RHO = 5
LEARNING_RATE = 1e-4
# (mel bins, frames): the paper's input (256 mels, ~5 s at hop 512) and a small one for a quick run.
SIZES = {"paper": (256, 431), "small": (64, 128), "tiny": (32, 48)}
# The vendors' dense (no sparsity) peaks in TFLOP/s, (bfloat16 tensor cores, float32 without tensor cores), matched
# against `jax.Device.device_kind`. XLA runs float32 matrix products on TF32 tensor cores by default on these GPUs,
# so a float32 MFU against the plain float32 peak can exceed 100 %.
PEAK_TFLOPS = {"H100 PCIe": (756.0, 51.0), "H100": (989.0, 67.0), "H200": (989.0, 67.0), "A100": (312.0, 19.5)}


@dataclasses.dataclass(frozen=True)
class Setup:
    """What both frameworks run: input shape, batch and model width."""

    mel_bins: int
    frames: int
    batch_size: int
    base_channels: int

    @property
    def input_label(self) -> str:
        return f"{self.mel_bins}x{self.frames}"


@dataclasses.dataclass
class Contender:
    """One framework ready to run: `run(n)` does n optimiser steps and returns once their results exist."""

    framework: str
    device: str
    prepare_seconds: float  # JAX: lowering and compiling; PyTorch: nothing to compile (0)
    warmup_seconds: float
    run: Callable[[int], None]
    flops_per_step: float | None = None  # XLA's cost analysis of the compiled step (JAX only)
    peak_flops: float | None = None  # the device's peak at the step's compute dtype, where known
    hlo_text: str | None = None  # the compiled step's optimised HLO (JAX only), which names the profiled operations


def random_batch(setup: Setup, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(stored-format crops: time-major float16, multi-hot labels): values do not change the cost of a step."""
    rng = np.random.default_rng(seed)
    spectrograms = rng.normal(size=(setup.batch_size, setup.frames, setup.mel_bins)).astype(np.float16)
    labels = (rng.random((setup.batch_size, NUM_TAGS)) < 0.05).astype(np.float32)
    return spectrograms, labels


def timed(function: Callable[[], None]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def peak_flops(device_kind: str, half_precision: bool) -> float | None:
    """The vendor's dense peak FLOP/s of a device at the compute dtype, or None where `PEAK_TFLOPS` lacks it."""
    for name, (bfloat16, float32) in PEAK_TFLOPS.items():
        if name in device_kind:
            return (bfloat16 if half_precision else float32) * 1e12
    return None


def compiled_flops(computation) -> float | None:
    """FLOPs of one call of a lowered or compiled computation by XLA's cost analysis (a dict, or a list of them in
    older JAX), or None where the backend gives none."""
    analysis = computation.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def jax_contender(setup: Setup, warmup: int, convs: str = "fast", half_precision: bool = False) -> Contender:
    """emorf_jax's real pmapped train step (SWA on, mixup off) on the first device of the chosen platform, with the
    model's default convolutions (`convs="fast"`) or XLA's own (`"xla"`)."""
    import jax
    import optax
    from flax import jax_utils

    from emorf_jax import train, weight_averaging

    device = jax.devices()[0]
    fields = {
        "num_classes": NUM_TAGS,
        "rho": RHO,
        "base_channels": setup.base_channels,
        "frequency_aware": True,
        "shake_shake": False,
    }
    model = train.create_model(fields, half_precision=half_precision, axis_name="batch").clone(
        fast_cpu_conv=convs == "fast"
    )
    schedule = optax.constant_schedule(LEARNING_RATE)
    tx = optax.adam(schedule)
    averaging = weight_averaging.AveragingSchedule("swa", swa_steps=(1,))
    normalisation = (np.zeros(setup.mel_bins, np.float32), np.ones(setup.mel_bins, np.float32))
    state = train.initial_state(
        model.clone(bn_axis_name=None), tx, jax.random.PRNGKey(0), (1, setup.mel_bins, setup.frames, 1)
    )

    def pmapped_step(model, device):
        return jax.pmap(
            functools.partial(
                train.train_step,
                model=model,
                tx=tx,
                mixup_alpha=0.0,
                pos_weight=10.0,
                mixup_reduction="batch_mean",
                averaging=averaging,
                learning_rate=schedule,
                normalisation=normalisation,
            ),
            axis_name="batch",
            devices=[device],
            donate_argnums=(0,),
        )

    spectrograms, labels = random_batch(setup)
    # Laid out as the input pipeline's prefetch_to_device lays out a batch: a leading axis split over the devices.
    sharding = jax.NamedSharding(jax.sharding.Mesh(np.array([device]), ("batch",)), jax.P("batch"))
    batch = jax.device_put({"spectrogram": spectrograms[None], "labels": labels[None]}, sharding)
    rng = jax_utils.replicate(jax.random.PRNGKey(1), devices=[device])
    replicated = jax_utils.replicate(state, devices=[device])
    start = time.perf_counter()
    step = pmapped_step(model, device).lower(replicated, batch, rng).compile()
    compile_seconds = time.perf_counter() - start
    # Counted on the same step lowered for the CPU with XLA's own convolutions, whatever the device: a GPU's lowered
    # step gives no cost analysis and its compiled one leaves out the convolutions (cuDNN calls), and the CPU kernel
    # gradient of models/conv.py loops over blocks of rows, whose body the analysis counts once. The arithmetic is
    # the same on every platform.
    on_host = jax.tree.map(np.asarray, (replicated, batch, rng))
    flops = compiled_flops(pmapped_step(model.clone(fast_cpu_conv=False), jax.devices("cpu")[0]).lower(*on_host))

    def run(num_steps: int) -> None:
        nonlocal replicated
        metrics = None
        for _ in range(num_steps):
            replicated, metrics = step(replicated, batch, rng)
        jax.block_until_ready((replicated, metrics))

    warmup_seconds = timed(lambda: run(warmup))
    name = "emorf_jax" if convs == "fast" else "emorf_jax (XLA convs)"
    dtype = "bfloat16" if half_precision else "float32"
    return Contender(
        name,
        f"{device.platform} {dtype}",
        compile_seconds,
        warmup_seconds,
        run,
        flops,
        peak_flops(device.device_kind, half_precision),
        step.as_text(),
    )


def torch_device(requested: str) -> str:
    """The torch device type for --device, checked before any work so that a missing CUDA fails at once."""
    import torch

    if requested == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit(
            f"--device gpu: this torch ({torch.__version__}) sees no CUDA device; install a CUDA build "
            "of torch, or pass --frameworks jax"
        )
    return "cuda"


def torch_contender(setup: Setup, warmup: int, threads: int, device_type: str) -> Contender:
    """The authors' architecture in PyTorch (NCHW) with Adam and BCE on logits, train mode."""
    import torch

    from tests.torch_reference import TorchCPResNet

    torch.set_num_threads(threads)
    device = torch.device(device_type)
    model = TorchCPResNet(NUM_TAGS, RHO, setup.base_channels, frequency_aware=True).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    criterion = torch.nn.BCEWithLogitsLoss()
    spectrograms, labels = random_batch(setup)
    # NCHW float32, normalised on the host beforehand (mean 0, std 1): PyTorch's step gets its input ready-made.
    inputs = torch.from_numpy(spectrograms.transpose(0, 2, 1)[:, None].astype(np.float32)).to(device)
    targets = torch.from_numpy(labels).to(device)

    def run(num_steps: int) -> None:
        for _ in range(num_steps):
            optimizer.zero_grad(set_to_none=True)
            criterion(model(inputs), targets).backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    warmup_seconds = timed(lambda: run(warmup))
    where = f"{device.type} ({threads} threads)" if device.type == "cpu" else device.type
    return Contender("pytorch", f"{where} float32", 0.0, warmup_seconds, run)


def measure(contenders: list[Contender], steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each contender in each repetition; the contenders alternate within a repetition."""
    seconds: dict[str, list[float]] = {c.framework: [] for c in contenders}
    for _ in range(repeats):
        for contender in contenders:
            seconds[contender.framework].append(timed(functools.partial(contender.run, steps)) / steps)
    return seconds


def summarise(setup: Setup, contenders: list[Contender], seconds: dict[str, list[float]]) -> list[dict]:
    rows = []
    for contender in contenders:
        per_step = seconds[contender.framework]
        median = statistics.median(per_step)
        flops = contender.flops_per_step
        rows.append(
            {
                "framework": contender.framework,
                "device": contender.device,
                "input": setup.input_label,
                "batch": setup.batch_size,
                "base_channels": setup.base_channels,
                "compile_seconds": round(contender.prepare_seconds, 2),
                "warmup_seconds": round(contender.warmup_seconds, 2),
                "steps_per_second": round(1 / median, 4),
                "examples_per_second": round(setup.batch_size / median, 3),
                "ms_per_example": round(median / setup.batch_size * 1e3, 2),
                "seconds_per_step_each_repeat": [round(s, 4) for s in per_step],
                "gflops_per_step": float(f"{flops / 1e9:.4g}") if flops else None,
                "achieved_tflops": round(flops / median / 1e12, 3) if flops else None,
                "mfu": round(flops / median / contender.peak_flops, 4) if flops and contender.peak_flops else None,
            }
        )
    torch_rate = next((row["examples_per_second"] for row in rows if row["framework"] == "pytorch"), None)
    for row in rows:
        row["over_pytorch"] = round(row["examples_per_second"] / torch_rate, 3) if torch_rate else None
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        "framework",
        "device",
        "input",
        "batch",
        "compile s",
        "warmup s",
        "s/step per repeat",
        "examples/s",
        "ms/example",
        "/ pytorch",
        "GFLOP/step",
        "TFLOP/s",
        "MFU",
    )
    lines = [
        [
            row["framework"],
            row["device"],
            row["input"],
            str(row["batch"]),
            f"{row['compile_seconds']:.1f}",
            f"{row['warmup_seconds']:.1f}",
            " ".join(f"{s:.3f}" for s in row["seconds_per_step_each_repeat"]),
            f"{row['examples_per_second']:.2f}",
            f"{row['ms_per_example']:.1f}",
            "-" if row["over_pytorch"] is None else f"{row['over_pytorch']:.2f}",
            "-" if row["gflops_per_step"] is None else f"{row['gflops_per_step']:.4g}",
            "-" if row["achieved_tflops"] is None else f"{row['achieved_tflops']:.3f}",
            "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}",
        ]
        for row in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in (header, *lines)
    )


def select_jax_platform(device: str) -> None:
    """Pin JAX to the requested platform before it starts, and fail clearly where that platform is missing."""
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    elif jax.default_backend() != "gpu":
        raise SystemExit(
            f"--device gpu: JAX found no GPU (its backend is {jax.default_backend()!r}); install "
            "jax[cuda] or run with --device cpu"
        )


def usable_cores() -> int:
    """The cores this process may run on (XLA sizes its CPU thread pool to them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def versions() -> dict[str, str]:
    import jax
    import jaxlib

    found = {"python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jaxlib.__version__}
    try:
        import torch

        found["torch"] = torch.__version__
    except ImportError:
        pass
    return found
