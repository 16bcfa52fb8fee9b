"""Training examples per second and bytes read per example of the input pipeline, on real shards.

    python -m benchmarks.input_pipeline --tracks 24 --duration 210 --out /tmp/bench_input_pipeline
    python -m benchmarks.input_pipeline --quick      # tiny sizes, for CI: the script cannot rot

Makes a synthetic MTG-Jamendo of real MP3s whose lengths spread like the real ones around `--duration` seconds
(the real median is 206 s), prepares it with the real batch step (hop512: 256 mel bands, 20-s chunks; not
timed), then times `input_pipeline.train_batches` at the paper's training crop (256 x 861 frames, ±50-frame
shifts) with its default two reading threads, as training runs it: per-track epochs, random crops read through
the record index, batching of the stored float16 frames. Reports examples/s, the spectrogram bytes read per example
against the crop's own bytes, and the cores the process used (CPU seconds per wall second). The shards sit in the
page cache, as they would after the first epoch on a machine with enough memory. The normalisation and transpose
into the model's layout run inside the jitted train step (`windowing.model_input`); their cost per example on
the default device is timed apart, and the stream at split-0's size is timed a second time as the training loop
consumes it, put on the default device two batches ahead (`examples_per_s_to_device`).

grain's global shuffle costs about 28/N ms per example for N training tracks (2-4 ms for the 12 of the default set,
0.017 ms for split-0's 9,949: its index shuffle walks a domain of at least 2^16), which would dominate a small set's
figure. The stream is therefore timed twice: on the training tracks as prepared, and with their index entries
repeated to split-0's 9,949 tracks (`--as_training_tracks`), so that the shuffle costs what it costs there; the
reads, bytes and work per example are those of the real shards either way. The shuffle alone is timed too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path

import grain
import jax
import numpy as np
from flax import jax_utils

from data_prep import layout, preparation, synthetic
from data_prep.reader import FrameReader, PreparedDataset, load_prepared
from emorf_jax import input_pipeline, windowing


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def prepare(out: Path, tracks: int, duration: float, workers: int) -> Path:
    """The prepared hop512 dataset of a synthetic tree in `out` (made once, reused by later runs)."""
    data_dir = out / "data"
    if not layout.is_prepared(data_dir, "hop512", 0):
        if not (out / "tree" / "audio").is_dir():
            synthetic.make_synthetic(out / "tree", num_tracks=tracks, seed=0, duration=duration, workers=workers)
        preparation.build_dataset(
            preparation.BuildOptions(
                out / "tree" / "audio",
                out / "tree" / "data",
                data_dir,
                features="hop512",
                workers=workers,
                progress=False,
            )
        )
    return data_dir


SPLIT0_TRAINING_TRACKS = 9949


def shuffle_ms_per_example(num_tracks: int, count: int = 2000) -> float:
    """The per-example cost of the epoch permutation that `training_examples` uses, for `num_tracks` tracks."""
    order = grain.MapDataset.range(num_tracks).seed(0).shuffle().repeat(None)
    start = time.perf_counter()
    for k in range(count):
        order[k]
    return (time.perf_counter() - start) / count * 1e3


def with_training_tracks(prepared: PreparedDataset, count: int) -> PreparedDataset:
    """`prepared` whose training part lists its tracks' index entries cyclically, `count` in all (same shards)."""
    train = prepared.parts["train"]
    order = np.resize(np.arange(len(train)), count)
    repeated = dataclasses.replace(
        train,
        track_ids=tuple(f"{train.track_ids[k]}#{n}" for n, k in enumerate(order)),
        frames=train.frames[order],
        labels=train.labels[order],
        first_chunk=train.first_chunk[order],
    )
    return dataclasses.replace(prepared, parts={**prepared.parts, "train": repeated})


def examples_per_second(
    prepared: PreparedDataset,
    *,
    batch_size: int,
    crop_frames: int,
    batches: int,
    read_threads: int,
    to_device: bool = False,
    verify_checksums: bool = False,
) -> tuple[float, float]:
    """(examples/s, cores used) of the training batches as training reads them; `to_device`: also put on the
    default device two batches ahead, as the training loop does (flax's `prefetch_to_device`); `verify_checksums`:
    each record's checksum checked on its first read (`config.dataset.verify_checksums`)."""
    stream = input_pipeline.train_batches(
        prepared,
        global_batch_size=batch_size,
        crop_frames=crop_frames,
        max_time_shift=50,
        seed=0,
        read_threads=read_threads,
        verify_checksums=verify_checksums,
    )
    if to_device:
        stream = jax_utils.prefetch_to_device(stream, 2)
    next(stream)  # start-up: threads, first reads
    cpu_before, start = _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
    jax.block_until_ready(batch)
    wall, cores_used = time.perf_counter() - start, (_cpu_seconds() - cpu_before) / (time.perf_counter() - start)
    return batches * batch_size / wall, cores_used


def device_normalisation_ms_per_example(
    prepared: PreparedDataset, *, batch_size: int, crop_frames: int, repeats: int = 20
) -> tuple[float, str]:
    """(ms per example, device) of `windowing.model_input` on a batch of stored crops, jitted on the default
    device: the work the train step took over from the host."""
    stored = jax.device_put(np.zeros((batch_size, crop_frames, prepared.features["n_mels"]), np.float16))
    normalise = jax.jit(windowing.model_input)
    normalise(stored, prepared.mean, prepared.std).block_until_ready()  # compiles
    start = time.perf_counter()
    for _ in range(repeats):
        normalise(stored, prepared.mean, prepared.std).block_until_ready()
    return (time.perf_counter() - start) / repeats / batch_size * 1e3, jax.devices()[0].platform


def measure(
    data_dir: Path, *, batch_size: int, crop_frames: int, batches: int, read_threads: int, as_training_tracks: int
) -> dict:
    prepared = load_prepared(data_dir, "hop512", 0)
    timing = dict(batch_size=batch_size, crop_frames=crop_frames, batches=batches, read_threads=read_threads)
    as_prepared, cores_as_prepared = examples_per_second(prepared, **timing)
    at_scale = with_training_tracks(prepared, as_training_tracks)
    rate, cores_used = examples_per_second(at_scale, **timing)
    to_device, cores_to_device = examples_per_second(at_scale, **timing, to_device=True)
    verified, _ = examples_per_second(at_scale, **timing, verify_checksums=True)
    examples = batches * batch_size
    # Bytes per example from the same stream read example by example (the threads above read ahead).
    reader = FrameReader(prepared)
    one_by_one = input_pipeline.training_examples(
        prepared, crop_frames=crop_frames, max_time_shift=50, seed=0, reader=reader
    )
    for k in range(examples):
        one_by_one[k]
    crop_bytes = crop_frames * prepared.features["n_mels"] * 2
    normalisation_ms, device = device_normalisation_ms_per_example(
        prepared, batch_size=batch_size, crop_frames=crop_frames
    )
    return {
        "training_tracks": len(prepared.parts["train"]),
        "median_track_frames": int(sorted(prepared.parts["train"].frames)[len(prepared.parts["train"]) // 2]),
        "chunk_frames": prepared.chunk_frames,
        "crop": f"{prepared.features['n_mels']} x {crop_frames}",
        "read_threads": read_threads,
        "examples": examples,
        "examples_per_s_as_prepared": round(as_prepared, 1),
        "cores_used_as_prepared": round(cores_as_prepared, 2),
        "as_training_tracks": as_training_tracks,
        "examples_per_s": round(rate, 1),
        "examples_per_s_verifying_checksums": round(verified, 1),
        "bytes_read_per_example": round(reader.bytes_read / examples),
        "bytes_read_per_crop_byte": round(reader.bytes_read / examples / crop_bytes, 3),
        "cores_used": round(cores_used, 2),
        "examples_per_s_to_device": round(to_device, 1),
        "cores_used_to_device": round(cores_to_device, 2),
        "shuffle_ms_per_example": round(shuffle_ms_per_example(len(prepared.parts["train"])), 3),
        "shuffle_ms_per_example_at_split0": round(shuffle_ms_per_example(SPLIT0_TRAINING_TRACKS), 3),
        "step_normalisation_ms_per_example": round(normalisation_ms, 3),
        "step_normalisation_device": device,
        "os_cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.input_pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="/tmp/bench_input_pipeline", help="where the synthetic data is kept")
    parser.add_argument("--tracks", type=int, default=24)
    parser.add_argument("--duration", type=float, default=210.0, help="median track length in seconds")
    parser.add_argument("--workers", type=int, default=2, help="processes that make and prepare the data")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--crop_frames", type=int, default=861, help="the paper's 10-s crop")
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--read_threads", type=int, default=2)
    parser.add_argument(
        "--as_training_tracks",
        type=int,
        default=SPLIT0_TRAINING_TRACKS,
        help="training tracks the second timing lists (the prepared ones, repeated)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    args = parser.parse_args()
    if args.quick:
        args.tracks, args.duration, args.crop_frames, args.batches, args.batch_size = 12, 4.0, 128, 5, 4
        args.out = str(Path(args.out) / "quick")
    data_dir = prepare(Path(args.out), args.tracks, args.duration, args.workers)
    print(
        json.dumps(
            measure(
                data_dir,
                batch_size=args.batch_size,
                crop_frames=args.crop_frames,
                batches=args.batches,
                read_threads=args.read_threads,
                as_training_tracks=args.as_training_tracks,
            ),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
