"""Training throughput of one optimiser step: emorf_jax's pmapped train step against the authors' PyTorch CP-ResNet.

    python -m benchmarks.train_step --size small
    python -m benchmarks.train_step --size paper --batch_size 8,16 --convs fast,xla --steps 2 --warmup 1 --repeats 3
    python -m benchmarks.train_step --device gpu --batch_size 64 --half_precision --frameworks jax
    python -m benchmarks.train_step --quick      # tiny sizes, for CI: the script cannot rot

What is timed and how: the library's docstring (`benchmarks/train_step/__init__.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.train_step import (
    SIZES,
    Setup,
    format_table,
    jax_contender,
    measure,
    select_jax_platform,
    summarise,
    torch_contender,
    torch_device,
    usable_cores,
    versions,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="paper: 256 mel bins x 431 frames; small: 64 x 128; tiny: 32 x 48",
    )
    parser.add_argument("--batch_size", default="16", help="a batch size, or several comma-separated (8,16)")
    parser.add_argument("--base_channels", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions; the median is reported")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--frameworks", default="jax,torch", help="comma-separated subset of jax,torch")
    parser.add_argument(
        "--convs",
        default="fast",
        help="emorf_jax's convolutions, comma-separated: fast (the default model), xla (XLA's own)",
    )
    parser.add_argument(
        "--half_precision",
        action="store_true",
        help="emorf_jax in bfloat16 compute with float32 parameters (PyTorch stays float32)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one step, for CI")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch_size, args.base_channels = "tiny", "4", 8
        args.steps, args.warmup, args.repeats = 1, 1, 1
    try:
        args.batch_sizes = [int(b) for b in args.batch_size.split(",")]
    except ValueError:
        parser.error(f"--batch_size takes comma-separated integers, got {args.batch_size!r}")
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    args.convs = args.convs.split(",")
    if not args.convs or set(args.convs) - {"fast", "xla"}:
        parser.error(f"--convs takes fast and/or xla, got {','.join(args.convs)!r}")
    for name in ("base_channels", "steps", "repeats"):
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
    import jax

    args = parse_args(argv)
    mel_bins, frames = SIZES[args.size]
    select_jax_platform(args.device)
    torch_device_type = torch_device(args.device) if "torch" in args.frameworks else None
    threads = usable_cores()
    load_before = os.getloadavg()
    rows = []
    for batch_size in args.batch_sizes:
        setup = Setup(mel_bins, frames, batch_size, args.base_channels)
        contenders = []
        if "jax" in args.frameworks:
            contenders += [jax_contender(setup, args.warmup, convs, args.half_precision) for convs in args.convs]
        if "torch" in args.frameworks:
            contenders.append(torch_contender(setup, args.warmup, threads, torch_device_type))
        rows += summarise(setup, contenders, measure(contenders, args.steps, args.repeats))
        del contenders  # free this batch size's states before the next
        if not args.json and batch_size != args.batch_sizes[-1]:
            print(format_table(rows), flush=True)  # so far, in case a long run is stopped
    context = {
        "command": " ".join(["python -m benchmarks.train_step", *(argv or sys.argv[1:])]),
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cores": threads,
        "device_kind": jax.devices()[0].device_kind,
        "versions": versions(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if args.json:
        print(json.dumps({"context": context, "results": rows}, indent=2))
    else:
        print(format_table(rows))
        print(
            f"{context['device_kind']}; load average before {context['load_average_before']}, after "
            f"{context['load_average_after']}; {threads} cores; median of {args.repeats} x {args.steps} steps; "
            + ", ".join(f"{k} {v}" for k, v in context["versions"].items())
        )


if __name__ == "__main__":
    main()
