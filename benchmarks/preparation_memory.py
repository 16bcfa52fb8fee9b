"""Peak memory of data preparation's workers over the real split-0 track lengths, longest first against the build's
schedule; and, measured, the peak memory of one worker extracting given audio files.

    python -m benchmarks.preparation_memory [--workers 16] [--memory_budget_gb 8]
    python -m benchmarks.preparation_memory --audio FILE [FILE ...] [--features hop512]

Replays stage 1 on the durations of every track of split-0's TSVs (no audio needed): a worker extracting a track
holds `extract.track_memory(track, settings)` bytes of the `--features` setting (what it buffers, measured: see
`extract.TRACK_BYTES_FIXED`) for a time proportional to its length. First every track sorted longest first, as many
running as there are workers; then `worker_pool._Schedule`, the order and memory budget the build uses. Prints the
peak of the workers' summed memory and how long the whole stage takes relative to a perfect split of the work over
the workers.

With --audio, each file is extracted as a build's worker does it (`extract.extract_track`, features into a temporary
cache) in a fresh process, one BLAS thread, after a one-second warm-up track: prints its resident memory before the
file, its peak while extracting it (the growth is what the file costs), and the seconds of audio, one JSON line each.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks import reference_data
from data_prep import extract, features, metadata, worker_pool

METADATA_DIR = reference_data.MTG_JAMENDO_METADATA


def replay(
    jobs: list[extract.TrackJob],
    workers: int,
    take: Callable[[], extract.TrackJob | None],
    finished: Callable[[extract.TrackJob], None],
    memory: Callable[[extract.TrackJob], int],
) -> tuple[int, float]:
    """(peak bytes held by the running workers, finishing time) when idle workers start `take()`'s jobs, each
    holding `memory(job)` bytes, and each job's end is told to `finished`."""
    running: list[tuple[float, int, extract.TrackJob]] = []  # (end time, tie-breaker, job)
    now, held, peak, counter = 0.0, 0, 0, 0
    remaining = len(jobs)
    while remaining:
        while len(running) < workers and (job := take()) is not None:
            heapq.heappush(running, (now + job.duration, counter, job))
            counter += 1
            held += memory(job)
            peak = max(peak, held)
        now, _, job = heapq.heappop(running)
        held -= memory(job)
        remaining -= 1
        finished(job)
    return peak, now


# Run in a fresh process per file (argv: the file, the feature setting): a one-second warm-up track (imports, filter
# banks), then the file, as one worker of a build extracts it; its memory before and at its peak, in bytes.
_MEASURE_ONE = """
import json, resource, sys, tempfile
from pathlib import Path
import numpy as np, soundfile, threadpoolctl
from data_prep import extract, features
threadpoolctl.threadpool_limits(limits=1)
path, settings = Path(sys.argv[1]), features.settings_for(sys.argv[2])
with tempfile.TemporaryDirectory() as directory:
    warm_up = Path(directory) / "warm_up.wav"
    soundfile.write(warm_up, np.random.default_rng(0).normal(0, 0.1, (44100, 2)), 44100)
    extract.extract_track(extract.TrackJob("warm_up", warm_up.name, 1.0), directory, directory, settings)
    before = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    info = soundfile.info(path)
    job = extract.TrackJob("measured", path.name, info.frames / info.samplerate)
    outcome = extract.extract_track(job, path.parent, directory, settings)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"outcome": outcome.kind, "audio_s": job.duration, "before": before, "peak": peak}))
"""


def measure(paths: list[Path], features: str) -> None:
    """One JSON line per file: the resident memory of a fresh worker process before and at the peak of extracting it
    (MiB), the growth, and the seconds of audio."""
    for path in paths:
        result = subprocess.run(
            [sys.executable, "-c", _MEASURE_ONE, str(path), features], capture_output=True, text=True, check=True
        )
        figures = json.loads(result.stdout.splitlines()[-1])
        mib = 2**20
        print(
            json.dumps(
                {
                    "file": str(path),
                    "features": features,
                    "outcome": figures["outcome"],
                    "audio_s": round(figures["audio_s"], 1),
                    "rss_before_mib": round(figures["before"] / mib),
                    "peak_rss_mib": round(figures["peak"] / mib),
                    "growth_mib": round((figures["peak"] - figures["before"]) / mib),
                }
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.preparation_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--metadata_dir", type=Path, default=METADATA_DIR)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--memory_budget_gb", type=float, default=worker_pool.DEFAULT_MEMORY_BUDGET_GB)
    parser.add_argument("--audio", type=Path, nargs="+", help="measure a worker's memory on these audio files")
    parser.add_argument("--features", default="hop512", help="the feature setting (default hop512)")
    args = parser.parse_args()
    if args.audio:
        measure(args.audio, args.features)
        return
    if not args.metadata_dir.is_dir():
        raise SystemExit(
            f"preparation_memory: {args.metadata_dir} not found; this benchmark needs the real MTG-Jamendo metadata"
        )
    tracks = [track for part in metadata.SPLIT_PARTS for track in metadata.read_split(args.metadata_dir, 0, part)]
    jobs = [extract.TrackJob(track.track_id, track.path, track.duration) for track in tracks]
    ideal = sum(job.duration for job in jobs) / args.workers

    memory = functools.partial(extract.track_memory, settings=features.settings_for(args.features))
    longest_first = sorted(jobs, key=lambda job: -job.duration)
    unbudgeted_peak, unbudgeted_end = replay(
        jobs, args.workers, lambda: longest_first.pop(0) if longest_first else None, lambda job: None, memory
    )
    schedule = worker_pool._Schedule(jobs, int(args.memory_budget_gb * 2**30), memory)
    peak, end = replay(jobs, args.workers, schedule.take, schedule.finished, memory)

    gib, mib = 2**30, 2**20
    longest = sorted(job.duration for job in jobs)[-args.workers :]
    print(
        f"split-0: {len(jobs)} tracks, {sum(j.duration for j in jobs) / 3600:.0f} h; the {args.workers} longest: "
        f"{longest[0] / 60:.0f}-{longest[-1] / 60:.0f} min; {args.workers} workers; {args.features}: a worker needs "
        f"{memory(extract.TrackJob('', '', 60.0)) / mib:.0f} MiB for a 1-min track, "
        f"{memory(extract.TrackJob('', '', 210.0)) / mib:.0f} MiB for 3.5 min, "
        f"{memory(extract.TrackJob('', '', max(longest))) / mib:.0f} MiB for the longest"
    )
    print("| order | peak of the workers' memory | stage 1 time / perfect split |")
    print("| --- | --- | --- |")
    print(f"| longest first, one per worker | {unbudgeted_peak / gib:.1f} GiB | {unbudgeted_end / ideal:.3f} |")
    print(
        f"| the build's: longest that fits a {args.memory_budget_gb:g} GiB budget | {peak / gib:.1f} GiB | "
        f"{end / ideal:.3f} |"
    )


if __name__ == "__main__":
    main()
