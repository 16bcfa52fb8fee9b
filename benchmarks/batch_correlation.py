"""How often a training batch holds two crops of the same track: the old chunk pipeline against the new one.

    python -m benchmarks.batch_correlation [--quick] [--seeds 0 1 2]

Why: the old pipeline stored every track as 20 s chunks in TSV order and mixed them only through a shuffled
shard order, a 16-file interleave and a 2,000-element shuffle buffer, so chunks of one track (and tracks of one
artist, since adjacent TSV rows mostly share an artist) stayed close together and often landed in the same
batch of 16; it also weighted tracks by their length. The new pipeline draws one crop per TRACK per epoch from a
global grain permutation. This script replays both orders on integer indices of the REAL split-0 training TSV
(no audio, no shards needed) and prints, per pipeline, the fraction of batches with a repeated track, the
fraction with two different tracks of one artist, and the mean number of distinct artists per batch.

Old pipeline, reproduced with the same tf.data ops as TFDS's reader: chunks of ``max(1, ceil(frames / 1722))``
per track with ``frames = 1 + floor(duration * 44100) // 512``; the shard count and boundaries come from TFDS's
own rule (`shard_utils.ShardConfig.get_number_shards` and `shard_utils.get_shard_boundaries`, as its writer calls
them) applied to the serialised size of the chunk examples; file order shuffled with the epoch seed, interleave
over 16 files with TFDS's default block length, `shuffle(2000)` with the same seed, `batch(16, drop_remainder=True)`;
one epoch.
New pipeline: ``grain.MapDataset.range(N).seed(seed).shuffle().repeat(None)``, batch s = examples [16 s, 16 s + 16),
over the first 3 epochs' worth of batches (an epoch may end inside a batch).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

_STARTED = time.perf_counter()  # the run time printed includes the TensorFlow import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grain  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from tensorflow_datasets.core.utils import shard_utils  # noqa: E402

from benchmarks import reference_data  # noqa: E402
from data_prep import metadata  # noqa: E402

METADATA_DIR = reference_data.MTG_JAMENDO_METADATA
SAMPLE_RATE = 44100
HOP = 512
N_MELS = 256
NUM_TAGS = 56
CHUNK_FRAMES = 1722  # 20 s, data_prep.features.FeatureSettings.chunk_frames
BATCH = 16
SHUFFLE_BUFFER = 2000  # the old configs/default.py input.shuffle_buffer
INTERLEAVE_CYCLE = 16  # the old shard writer's TRAINING_INTERLEAVE (then data_prep.builder)
INTERLEAVE_BLOCK = tfds.ReadConfig().interleave_block_length  # TFDS default (16), the old code did not set it
NEW_EPOCHS = 3
QUICK_ROWS = 2000


def track_frames(duration: float) -> int:
    return 1 + int(math.floor(duration * SAMPLE_RATE)) // HOP


def example_overhead() -> int:
    """Serialised bytes of one old chunk example beyond its spectrogram bytes (feature spec of the old shard writer)."""
    features = tfds.features.FeaturesDict(
        {
            "spectrogram": tfds.features.Tensor(
                shape=(N_MELS, None), dtype=np.float16, encoding=tfds.features.Encoding.BYTES
            ),
            "labels": tfds.features.Tensor(shape=(NUM_TAGS,), dtype=np.bool_),
            "track_id": tfds.features.Text(),
            "artist_id": tfds.features.Text(),
            "duration": tfds.features.Scalar(dtype=np.float32),
            "chunk_index": tfds.features.Scalar(dtype=np.int32),
            "num_chunks": tfds.features.Scalar(dtype=np.int32),
            "num_frames": tfds.features.Scalar(dtype=np.int32),
        }
    )
    spectrogram = np.zeros((N_MELS, CHUNK_FRAMES), np.float16)
    serialized = features.serialize_example(
        {
            "spectrogram": spectrogram,
            "labels": np.ones(NUM_TAGS, np.bool_),
            "track_id": "track_0000948",
            "artist_id": "artist_000087",
            "duration": np.float32(212.7),
            "chunk_index": np.int32(0),
            "num_chunks": np.int32(8),
            "num_frames": np.int32(18317),
        }
    )
    return len(serialized) - spectrogram.nbytes


def shard_ranges(chunk_frames: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) chunk indices of every train shard, by TFDS's rule for the dataset's serialised size."""
    total_size = int(chunk_frames.sum()) * N_MELS * 2 + len(chunk_frames) * example_overhead()
    num_shards = shard_utils.ShardConfig().get_number_shards(total_size, len(chunk_frames))
    ends = shard_utils.get_shard_boundaries(len(chunk_frames), num_shards)
    return list(zip([0, *ends[:-1]], ends))


def old_epoch(shards: list[tuple[int, int]], seed: int) -> np.ndarray:
    """Chunk indices of one epoch's batches, (steps, BATCH), as the old tfds + tf.data pipeline read them."""
    epoch_seed = seed * 1_000_003  # the old _train_epoch_dataset's seed for epoch 0
    starts, ends = (np.asarray(column, np.int64) for column in zip(*shards))
    files = tf.data.Dataset.from_tensor_slices((starts, ends)).shuffle(len(shards), seed=epoch_seed)
    chunks = files.interleave(
        lambda start, end: tf.data.Dataset.range(start, end),
        cycle_length=INTERLEAVE_CYCLE,
        block_length=INTERLEAVE_BLOCK,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    batches = chunks.shuffle(SHUFFLE_BUFFER, seed=epoch_seed, reshuffle_each_iteration=False)
    batches = batches.batch(BATCH, drop_remainder=True).batch(4096)  # the outer batch only speeds up reading
    return np.concatenate(list(batches.as_numpy_iterator()))


def new_batches(num_tracks: int, seed: int, epochs: int) -> np.ndarray:
    """Track indices of the first `epochs` epochs' worth of batches, (steps, BATCH), from the grain stream."""
    stream = grain.MapDataset.range(num_tracks).seed(seed).shuffle().repeat(None)
    steps = epochs * num_tracks // BATCH
    return np.fromiter((stream[k] for k in range(steps * BATCH)), np.int64).reshape(steps, BATCH)


def batch_stats(tracks: np.ndarray, artist_of: np.ndarray) -> tuple[float, float, float]:
    """(fraction with a repeated track, fraction with two different tracks of one artist, mean distinct artists)."""
    repeated_track = repeated_artist = distinct_artists = 0
    for row in tracks:
        distinct_tracks = np.unique(row)
        artists = artist_of[distinct_tracks]
        num_artists = len(np.unique(artists))
        repeated_track += len(distinct_tracks) < len(row)
        repeated_artist += num_artists < len(distinct_tracks)
        distinct_artists += num_artists
    return repeated_track / len(tracks), repeated_artist / len(tracks), distinct_artists / len(tracks)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batch_correlation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=f"only the first {QUICK_ROWS} training rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--metadata_dir", type=Path, default=METADATA_DIR, help="MTG-Jamendo's data/ folder")
    args = parser.parse_args(argv)

    tsv = metadata.split_tsv_path(args.metadata_dir, 0, "train")
    if not tsv.is_file():
        raise SystemExit(
            f"batch_correlation: {tsv} not found; this benchmark needs the real MTG-Jamendo metadata "
            "(pass --metadata_dir DIR for another copy of its data/ folder)"
        )
    tracks = metadata.read_split(args.metadata_dir, 0, "train")
    if args.quick:
        tracks = tracks[:QUICK_ROWS]
    _, artist_of = np.unique([track.artist_id for track in tracks], return_inverse=True)
    frames = np.array([track_frames(track.duration) for track in tracks], np.int64)
    chunks_per_track = np.maximum(1, -(-frames // CHUNK_FRAMES))
    chunk_track = np.repeat(np.arange(len(tracks)), chunks_per_track)
    chunk_frames = np.minimum(
        CHUNK_FRAMES,
        frames[chunk_track]
        - CHUNK_FRAMES
        * (np.arange(len(chunk_track)) - np.repeat(np.cumsum(chunks_per_track) - chunks_per_track, chunks_per_track)),
    )
    shards = shard_ranges(chunk_frames)
    sizes = [end - start for start, end in shards]

    print(
        f"split-0 train rows: {len(tracks)}{' (--quick)' if args.quick else ''}, artists: {artist_of.max() + 1}, "
        f"adjacent TSV rows sharing an artist: {np.mean(artist_of[1:] == artist_of[:-1]):.1%}"
    )
    print(
        f"old: {len(chunk_track)} chunks of <= {CHUNK_FRAMES} frames, "
        f"{(int(chunk_frames.sum()) * N_MELS * 2) / 2**30:.1f} GiB of float16, {len(shards)} TFDS shards "
        f"({min(sizes)}-{max(sizes)} chunks each); interleave cycle {INTERLEAVE_CYCLE}, block {INTERLEAVE_BLOCK}, "
        f"shuffle buffer {SHUFFLE_BUFFER}"
    )
    mean_chunks = chunks_per_track.mean()
    print(
        f"old per-track weight (chunks / mean chunks): min {chunks_per_track.min() / mean_chunks:.2f}, "
        f"max {chunks_per_track.max() / mean_chunks:.2f} (chunks per track {chunks_per_track.min()}-"
        f"{chunks_per_track.max()}, mean {mean_chunks:.2f})"
    )
    print(
        f"steps per epoch at batch {BATCH}: old {len(chunk_track) // BATCH} (chunks), "
        f"new {len(tracks) // BATCH} (tracks)\n"
    )

    header = ("pipeline", "seed", "batches", "repeated track (batches)", "2 tracks, 1 artist", "distinct artists")
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for name, make in (
        ("old, 1 epoch", lambda seed: chunk_track[old_epoch(shards, seed)]),
        (f"new, {NEW_EPOCHS} epochs", lambda seed: new_batches(len(tracks), seed, NEW_EPOCHS)),
    ):
        results = []
        for seed in args.seeds:
            batch_tracks = make(seed)
            results.append(batch_stats(batch_tracks, artist_of))
            print(
                f"| {name} | {seed} | {len(batch_tracks)} | {results[-1][0]:.1%} "
                f"({round(results[-1][0] * len(batch_tracks))}) | {results[-1][1]:.1%} | "
                f"{results[-1][2]:.2f} |"
            )
        mean = np.mean(results, axis=0)
        print(f"| {name} | mean | | **{mean[0]:.1%}** | {mean[1]:.1%} | {mean[2]:.2f} |")
    print(f"\nrun time {time.perf_counter() - _STARTED:.1f} s")


if __name__ == "__main__":
    main()
