"""The whole `python -m emorf_jax.predict` command as a user runs it: wall time, real-time factor, peak memory of the
process and its feature processes together, and the steady rate at which rows arrive.

    python -m benchmarks.tagging_command AUDIO_DIR --checkpoint=CKPT [--variant="--backend=onnxruntime" ...]
        [--baseline_tree=DIR] [--musicnn_python=PYTHON]
    python -m benchmarks.tagging_command --quick      # tiny sizes, for CI: the script cannot rot

Each variant (extra `predict` flags) runs `--repeats` times in turn with the others (A B A B ...), after `--warmups`
untimed rounds (they fill the ONNX caches: export and int8 calibration happen once per checkpoint and calibration
files). Two more contenders can join the turns: `--baseline_tree`, a checkout of another commit of this repository
(e.g. `git worktree add /tmp/base 68c2719`), whose `predict` runs with its defaults from there; and
`--musicnn_python`, the Python of an environment where musicnn is installed, which runs `benchmarks/musicnn_folder.py`
(musicnn's MTT model over the same files, in one process). Memory is the summed resident set of the command's process
tree, sampled every 0.1 s; the steady rate is the rows of a `.jsonl` output that arrive between the `--skip`-th row
and the last, per second of the time between them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import soundfile

SAMPLE_SECONDS = 0.1


def audio_seconds(directory: str) -> tuple[int, float]:
    """(files, seconds of audio) under `directory`, from the files' headers."""
    from emorf_jax.tagger import audio_files

    files = audio_files([directory])
    return len(files), sum(soundfile.info(str(path)).duration for path in files)


def run_once(command: list[str], output: Path, skip: int, cwd: str | None = None) -> dict:
    """Runs `command` (in `cwd`) to its end; its wall seconds, peak summed RSS (GiB) and steady rows/s of `output`."""
    output.unlink(missing_ok=True)
    start = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    peak, arrivals = 0, []
    while process.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.NoSuchProcess:
            pass
        rows = sum(1 for _ in output.open()) if output.exists() else 0
        arrivals += [time.perf_counter()] * (rows - len(arrivals))
        time.sleep(SAMPLE_SECONDS)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}: {process.stderr.read().decode()}")
    rows = sum(1 for _ in output.open())
    arrivals += [time.perf_counter()] * (rows - len(arrivals))
    span = arrivals[-1] - arrivals[skip - 1] if len(arrivals) > skip + 1 else 0.0
    steady = (len(arrivals) - skip) / span if span > 0 else None  # None: too few rows, or all in one sample
    return {"wall_s": wall, "peak_gib": peak / 2**30, "rows_per_s": steady}


def contenders(
    directory: str, checkpoint: str, variants: list[str], baseline_tree: str | None, musicnn_python: str | None
) -> dict[str, tuple[list[str], str | None]]:
    """{name: (command without its output flag, working directory)} of everything timed."""
    predict = [sys.executable, "-m", "emorf_jax.predict", directory, f"--checkpoint={checkpoint}", "--no_progress"]
    commands = {variant or "(defaults)": (predict + variant.split(), None) for variant in variants}
    if baseline_tree:
        commands[f"predict at {baseline_tree}"] = (predict, str(Path(baseline_tree).resolve()))
    if musicnn_python:
        from emorf_jax.tagger import audio_files

        files = [str(path.resolve()) for path in audio_files([directory])]
        repository = str(Path(__file__).resolve().parents[1])
        commands["musicnn (MTT_musicnn)"] = ([musicnn_python, "-m", "benchmarks.musicnn_folder", *files], repository)
    return commands


def measure(
    directory: str,
    checkpoint: str,
    variants: list[str],
    repeats: int,
    warmups: int,
    skip: int,
    work: Path,
    baseline_tree: str | None = None,
    musicnn_python: str | None = None,
) -> dict:
    files, seconds = audio_seconds(directory)
    results = {"files": files, "audio_seconds": round(seconds, 1), "variants": {}}
    commands = contenders(directory, checkpoint, variants, baseline_tree, musicnn_python)
    runs = {name: [] for name in commands}
    for round_index in range(warmups + repeats):
        for index, (name, (command, cwd)) in enumerate(commands.items()):
            output = work / f"out{index}.jsonl"
            figures = run_once([*command, f"--output={output}"], output, skip, cwd)
            if round_index >= warmups:  # the first rounds warm the caches
                runs[name].append(figures)
    for variant, measured in runs.items():
        wall = statistics.median(r["wall_s"] for r in measured)
        steady = [r["rows_per_s"] for r in measured if r["rows_per_s"]]
        results["variants"][variant] = {
            "wall_s": round(wall, 2),
            "wall_s_all": [round(r["wall_s"], 2) for r in measured],
            "real_time_factor": round(seconds / wall, 1),
            "peak_gib": round(max(r["peak_gib"] for r in measured), 2),
            "steady_files_per_s": round(statistics.median(steady), 2) if steady else None,
            "steady_real_time_factor": round(statistics.median(steady) * seconds / files, 1) if steady else None,
        }
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tagging_command",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", nargs="?", help="the audio to tag")
    parser.add_argument("--checkpoint", help="the checkpoint to tag with")
    parser.add_argument("--variant", action="append", help="extra predict flags, one string per variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmups", type=int, default=1, help="untimed rounds first (0 when the caches are warm)")
    parser.add_argument("--skip", type=int, default=20, help="rows before the steady rate is counted")
    parser.add_argument("--baseline_tree", help="a checkout of another commit whose predict joins the turns")
    parser.add_argument("--musicnn_python", help="the Python of an environment with musicnn, which joins the turns")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="emorf_tagging_bench_") as work:
        work = Path(work)
        if args.quick:
            from benchmarks.tagging_inputs import save_checkpoint, write_track

            args.checkpoint = save_checkpoint(work / "checkpoint", 4, 172)
            args.directory = str(work / "audio")
            for index in range(3):
                write_track(work / "audio" / f"track{index}.mp3", 4.0 + index)
            args.variant = args.variant or ["", "--backend=onnxruntime --precision=int8"]
            args.repeats, args.skip = 1, 1
        elif not (args.directory and args.checkpoint):
            parser.error("give the audio DIRECTORY and --checkpoint (or --quick)")
        variants = args.variant or [""]
        figures = measure(
            args.directory,
            args.checkpoint,
            variants,
            args.repeats,
            args.warmups,
            args.skip,
            work,
            args.baseline_tree,
            args.musicnn_python,
        )
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
