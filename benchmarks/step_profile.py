"""Where a train step's time goes: the real pmapped step under JAX's profiler, its operations grouped by kind.

    python -m benchmarks.step_profile --device gpu --batch_size 64 --half_precision     # the GPU question
    python -m benchmarks.step_profile --size paper --batch_size 8                       # the same on this CPU
    python -m benchmarks.step_profile --quick     # tiny sizes on the CPU, for CI: the script cannot rot

The step is `benchmarks.train_step`'s (the FA CP-ResNet at ρ 5, Adam, BatchNorm and SWA updates, the input's
normalisation; XLA's own convolutions on a GPU, the CPU's fast ones on a CPU), compiled once, run `--warmup` steps,
then `--steps` steps timed, then as many inside `jax.profiler.trace`. Every operation the trace times that is an
instruction of the compiled program (the "XLA Ops" line of each GPU, the XLA thread pool's events on a CPU) is put
in one group by what it computes, read from the optimised HLO: a fusion or call by the highest-ranked operation
inside it (`GROUPS`, in rank order: convolution, matrix product, collective, reduction - BatchNorm statistics,
pooling, the loss -, concatenation - the FA channel -, layout - transposes, copies -, elementwise). The table gives
each group's device milliseconds per step and share, the step's wall time and the share of it that no timed
operation covers (launch gaps, host work; on a CPU also the operations XLA runs outside its thread pool, which the
trace does not time), and the costliest operations; the trace folder is kept (`--trace_dir`) for TensorBoard or
Perfetto.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

from benchmarks.train_step import SIZES, Setup, jax_contender, select_jax_platform

# Operation groups in rank order: a fusion belongs to the first group any operation inside it is in.
GROUPS = (
    ("convolution", ("convolution",)),
    ("matrix product", ("dot",)),
    ("collective", ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")),
    ("reduction", ("reduce", "reduce-window", "select-and-scatter", "scatter", "sort")),
    ("concatenation", ("concatenate",)),
    ("layout", ("transpose", "copy", "copy-start", "copy-done")),
)
ELEMENTWISE = "elementwise and other"
# Custom calls by their target: cuDNN's convolutions and cuBLAS's products on a GPU.
CUSTOM_CALL_GROUPS = (("conv", "convolution"), ("gemm", "matrix product"), ("matmul", "matrix product"))

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([a-z][\w\-]*)\(")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def hlo_instructions(hlo_text: str) -> tuple[dict[str, tuple[str, str]], dict[str, list[str]]]:
    """(instruction name: (opcode, its line), computation name: its instructions' names) of an HLO module's text."""
    instructions, computations, current = {}, collections.defaultdict(list), None
    for line in hlo_text.splitlines():
        if not line.startswith((" ", "\t")):
            header = _COMPUTATION.match(line)
            current = header.group(1) if header else None
            continue
        found = _INSTRUCTION.match(line)
        if found and current is not None:
            instructions[found.group(1)] = (found.group(2), line)
            computations[current].append(found.group(1))
    return instructions, dict(computations)


def instruction_groups(hlo_text: str) -> dict[str, str]:
    """The group (`GROUPS`, or ELEMENTWISE) of every instruction of an HLO module, a fusion or call by the
    operations inside the computations it calls."""
    instructions, computations = hlo_instructions(hlo_text)
    ranks = {name: rank for rank, (name, _) in enumerate(GROUPS)}
    opcode_rank = {opcode: rank for rank, (_, opcodes) in enumerate(GROUPS) for opcode in opcodes}
    cache: dict[str, int] = {}

    def rank_of(name: str, seen: frozenset) -> int:
        if name in cache:
            return cache[name]
        opcode, line = instructions[name]
        rank = opcode_rank.get(opcode, len(GROUPS))
        if opcode == "custom-call":
            target = (_TARGET.search(line) or [None, ""])[1].lower()
            rank = next((ranks[group] for key, group in CUSTOM_CALL_GROUPS if key in target), rank)
        for called in _CALLED.findall(line):
            if called in computations and called not in seen:
                inner = [rank_of(child, seen | {called}) for child in computations[called]]
                rank = min([rank, *inner])
        cache[name] = rank
        return rank

    names = [name for name, _ in GROUPS] + [ELEMENTWISE]
    return {name: names[rank_of(name, frozenset())] for name in instructions}


def timed_operations(trace_dir: str, known: set[str]) -> dict[str, float]:
    """Seconds per instruction name over a trace, counting each operation once: on a device plane its "XLA Ops"
    line alone (its other lines repeat the same work as kernels and modules), elsewhere every event named by an
    instruction of the program (`known`)."""
    from jax.profiler import ProfileData

    seconds: dict[str, float] = collections.defaultdict(float)
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            lines = list(plane.lines)
            ops_lines = [line for line in lines if line.name == "XLA Ops"]
            for line in ops_lines or lines:
                for event in line.events:
                    name = event.name.lstrip("%")
                    if name in known:
                        seconds[name] += event.duration_ns * 1e-9
    return dict(seconds)


def profile(setup: Setup, steps: int, warmup: int, half_precision: bool, trace_dir: str, device: str) -> dict:
    """The step's wall time and its timed operations by group (see the module docstring)."""
    import jax

    contender = jax_contender(setup, warmup, "xla" if device == "gpu" else "fast", half_precision)
    groups = instruction_groups(contender.hlo_text)
    start = time.perf_counter()
    contender.run(steps)
    wall = (time.perf_counter() - start) / steps  # without the profiler, whose own cost is not the step's
    with jax.profiler.trace(trace_dir):
        contender.run(steps)
    operations = timed_operations(trace_dir, set(groups))
    by_group = collections.defaultdict(float)
    for name, seconds in operations.items():
        by_group[groups[name]] += seconds / steps
    timed = sum(by_group.values())
    costliest = sorted(operations.items(), key=lambda item: -item[1])[:15]
    return {
        "device": f"{jax.devices()[0].device_kind} ({contender.device})",
        "setup": {"input": setup.input_label, "batch_size": setup.batch_size, "base_channels": setup.base_channels},
        "steps": steps,
        "step_wall_ms": wall * 1e3,
        "timed_ms": timed * 1e3,
        "untimed_share": max(0.0, 1.0 - timed / wall) if wall else None,
        "mfu": None
        if not (contender.flops_per_step and contender.peak_flops)
        else contender.flops_per_step / wall / contender.peak_flops,
        "groups": [
            {"group": name, "ms": seconds * 1e3, "share": seconds / timed if timed else 0.0}
            for name, seconds in sorted(by_group.items(), key=lambda item: -item[1])
        ],
        "costliest": [
            {"operation": name, "group": groups[name], "ms": seconds / steps * 1e3} for name, seconds in costliest
        ],
        "trace_dir": trace_dir,
    }


def format_report(result: dict) -> str:
    lines = [
        f"{result['device']}, input {result['setup']['input']}, batch {result['setup']['batch_size']}, width "
        f"{result['setup']['base_channels']}: {result['step_wall_ms']:.1f} ms per step (wall), "
        f"{result['timed_ms']:.1f} ms in timed operations"
        + ("" if result["untimed_share"] is None else f", {result['untimed_share']:.0%} of the step outside them")
        + ("" if result["mfu"] is None else f"; MFU {result['mfu']:.1%}"),
        "",
        "| group | ms per step | share of timed |",
        "| --- | --- | --- |",
        *(f"| {row['group']} | {row['ms']:.2f} | {row['share']:.1%} |" for row in result["groups"]),
        "",
        "| costliest operations | group | ms per step |",
        "| --- | --- | --- |",
        *(f"| {row['operation']} | {row['group']} | {row['ms']:.2f} |" for row in result["costliest"]),
        "",
        f"trace: {result['trace_dir']} (TensorBoard's profile plugin or Perfetto open it)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.step_profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="paper", help="input (mel bins x frames)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--base_channels", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps after compiling, before the trace")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--half_precision", action="store_true", help="bfloat16 compute, as on accelerators")
    parser.add_argument("--trace_dir", default=None, help="where the trace goes (default: a new temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU, for CI")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch_size, args.base_channels, args.steps, args.warmup = "tiny", 4, 8, 1, 1
    for name in ("batch_size", "base_channels", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must not be negative, got {args.warmup}")
    select_jax_platform(args.device)
    mel_bins, frames = SIZES[args.size]
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="step_profile_")
    setup = Setup(mel_bins, frames, args.batch_size, args.base_channels)
    result = profile(setup, args.steps, args.warmup, args.half_precision, trace_dir, args.device)
    result["command"] = " ".join(["python -m benchmarks.step_profile", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(result, indent=2) if args.json else format_report(result))


if __name__ == "__main__":
    main()
