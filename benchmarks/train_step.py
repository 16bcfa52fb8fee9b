"""Training throughput of one optimiser step: emorf_jax's pmapped train step against the authors' PyTorch CP-ResNet.

    python -m benchmarks.train_step --size small
    python -m benchmarks.train_step --size paper --steps 2 --warmup 1 --repeats 3

Both sides run a full step of the FA CP-ResNet (ρ=5) in float32 on the same batch shape: forward, backward,
Adam update and BatchNorm update (emorf_jax's step also updates its SWA average; mixup is off). emorf_jax is timed
through `train.train_step` under `jax.pmap(axis_name="batch")` on one device, compiled ahead of time so that compile
seconds are reported apart; PyTorch is `tests/torch_reference.TorchCPResNet` (the authors' architecture) with
`torch.optim.Adam` and `BCEWithLogitsLoss` in train mode, on as many threads as this process may use (XLA's CPU
thread pool uses them all). Repetitions of both frameworks alternate, so that the load of a shared machine falls on
both alike; the medians are reported. Run it from the repository root as a module (it imports `tests`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
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
SIZES = {"paper": (256, 431), "small": (64, 128)}


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


def random_batch(setup: Setup, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(spectrograms NHWC, multi-hot labels): values do not change the cost of a step."""
    rng = np.random.default_rng(seed)
    spectrograms = rng.normal(size=(setup.batch_size, setup.mel_bins, setup.frames, 1)).astype(np.float32)
    labels = (rng.random((setup.batch_size, NUM_TAGS)) < 0.05).astype(np.float32)
    return spectrograms, labels


def timed(function: Callable[[], None]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def jax_contender(setup: Setup, warmup: int) -> Contender:
    """emorf_jax's real pmapped train step (SWA on, mixup off) on the first device of the chosen platform."""
    import jax
    from flax import jax_utils
    import optax

    from emorf_jax import train, weight_averaging

    device = jax.devices()[0]
    fields = {"num_classes": NUM_TAGS, "rho": RHO, "base_channels": setup.base_channels,
              "frequency_aware": True, "shake_shake": False}
    model = train.create_model(fields, axis_name="batch")
    schedule = optax.constant_schedule(LEARNING_RATE)
    tx = optax.adam(schedule)
    averaging = weight_averaging.AveragingSchedule("swa", start_step=1, every_steps=1)
    state = train.initial_state(model.clone(bn_axis_name=None), tx, jax.random.PRNGKey(0),
                                (1, setup.mel_bins, setup.frames, 1))
    p_train_step = jax.pmap(
        functools.partial(train.train_step, model=model, tx=tx, mixup_alpha=0.0, averaging=averaging,
                          learning_rate=schedule),
        axis_name="batch", devices=[device], donate_argnums=(0,))

    spectrograms, labels = random_batch(setup)
    # Laid out as the input pipeline's prefetch_to_device lays out a batch: a leading axis split over the devices.
    sharding = jax.NamedSharding(jax.sharding.Mesh(np.array([device]), ("batch",)), jax.P("batch"))
    batch = jax.device_put({"spectrogram": spectrograms[None], "labels": labels[None]}, sharding)
    rng = jax_utils.replicate(jax.random.PRNGKey(1), devices=[device])
    replicated = jax_utils.replicate(state, devices=[device])
    start = time.perf_counter()
    step = p_train_step.lower(replicated, batch, rng).compile()
    compile_seconds = time.perf_counter() - start

    def run(num_steps: int) -> None:
        nonlocal replicated
        metrics = None
        for _ in range(num_steps):
            replicated, metrics = step(replicated, batch, rng)
        jax.block_until_ready((replicated, metrics))

    warmup_seconds = timed(lambda: run(warmup))
    return Contender("emorf_jax", device.platform, compile_seconds, warmup_seconds, run)


def torch_device(requested: str) -> str:
    """The torch device type for --device, checked before any work so that a missing CUDA fails at once."""
    import torch

    if requested == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit(f"--device gpu: this torch ({torch.__version__}) sees no CUDA device; install a CUDA build "
                         "of torch, or pass --frameworks jax")
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
    inputs = torch.from_numpy(spectrograms.transpose(0, 3, 1, 2).copy()).to(device)
    targets = torch.from_numpy(labels).to(device)

    def run(num_steps: int) -> None:
        for _ in range(num_steps):
            optimizer.zero_grad(set_to_none=True)
            criterion(model(inputs), targets).backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    warmup_seconds = timed(lambda: run(warmup))
    return Contender("pytorch", f"{device.type} ({threads} threads)" if device.type == "cpu" else device.type,
                     0.0, warmup_seconds, run)


def measure(contenders: list[Contender], steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each contender in each repetition; the contenders alternate within a repetition."""
    seconds: dict[str, list[float]] = {c.framework: [] for c in contenders}
    for _ in range(repeats):
        for contender in contenders:
            seconds[contender.framework].append(timed(lambda: contender.run(steps)) / steps)
    return seconds


def summarise(setup: Setup, contenders: list[Contender], seconds: dict[str, list[float]]) -> list[dict]:
    rows = []
    for contender in contenders:
        per_step = seconds[contender.framework]
        median = statistics.median(per_step)
        rows.append({
            "framework": contender.framework, "device": contender.device, "input": setup.input_label,
            "batch": setup.batch_size, "base_channels": setup.base_channels,
            "compile_seconds": round(contender.prepare_seconds, 2),
            "warmup_seconds": round(contender.warmup_seconds, 2),
            "steps_per_second": round(1 / median, 4),
            "examples_per_second": round(setup.batch_size / median, 3),
            "seconds_per_step_each_repeat": [round(s, 4) for s in per_step],
        })
    return rows


def jax_over_torch(rows: list[dict]) -> float | None:
    by_framework = {row["framework"]: row["examples_per_second"] for row in rows}
    if {"emorf_jax", "pytorch"} <= by_framework.keys():
        return round(by_framework["emorf_jax"] / by_framework["pytorch"], 3)
    return None


def format_table(rows: list[dict], ratio: float | None) -> str:
    header = ("framework", "device", "input", "batch", "compile s", "warmup s", "steps/s", "examples/s",
              "s/step per repeat")
    lines = [[row["framework"], row["device"], row["input"], str(row["batch"]), f"{row['compile_seconds']:.1f}",
              f"{row['warmup_seconds']:.1f}", f"{row['steps_per_second']:.3f}", f"{row['examples_per_second']:.2f}",
              " ".join(f"{s:.3f}" for s in row["seconds_per_step_each_repeat"])] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in (header, *lines)]
    if ratio is not None:
        text.append(f"examples/s ratio emorf_jax / pytorch: {ratio:.2f}")
    return "\n".join(text)


def select_jax_platform(device: str) -> None:
    """Pin JAX to the requested platform before it starts, and fail clearly where that platform is missing."""
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    elif jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu: JAX found no GPU (its backend is {jax.default_backend()!r}); install "
                         "jax[cuda] or run with --device cpu")


def usable_cores() -> int:
    """The cores this process may run on (XLA sizes its CPU thread pool to them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="paper: 256 mel bins x 431 frames; small: 64 x 128")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--base_channels", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions; the median is reported")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--frameworks", default="jax,torch", help="comma-separated subset of jax,torch")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    for name in ("batch_size", "base_channels", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must not be negative, got {args.warmup}")
    frameworks = args.frameworks.split(",")
    unknown = set(frameworks) - {"jax", "torch"}
    if unknown or not frameworks:
        parser.error(f"--frameworks takes jax and/or torch, got {args.frameworks!r}")
    args.frameworks = frameworks
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mel_bins, frames = SIZES[args.size]
    setup = Setup(mel_bins, frames, args.batch_size, args.base_channels)
    select_jax_platform(args.device)
    torch_device_type = torch_device(args.device) if "torch" in args.frameworks else None
    threads = usable_cores()
    load_before = os.getloadavg()
    contenders = []
    if "jax" in args.frameworks:
        contenders.append(jax_contender(setup, args.warmup))
    if "torch" in args.frameworks:
        contenders.append(torch_contender(setup, args.warmup, threads, torch_device_type))
    seconds = measure(contenders, args.steps, args.repeats)
    rows = summarise(setup, contenders, seconds)
    ratio = jax_over_torch(rows)
    context = {"command": " ".join(["python -m benchmarks.train_step", *(argv or sys.argv[1:])]),
               "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup, "cores": threads,
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()],
               "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if args.json:
        print(json.dumps({"context": context, "results": rows, "jax_over_torch": ratio}, indent=2))
    else:
        print(format_table(rows, ratio))
        print(f"load average before {context['load_average_before']}, after {context['load_average_after']}; "
              f"{threads} cores; median of {args.repeats} x {args.steps} steps")


if __name__ == "__main__":
    main()
