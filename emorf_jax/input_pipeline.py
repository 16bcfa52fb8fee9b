"""Prepared data -> training batches (one crop per track per epoch), loaded by grain (the [train] extra).

Training follows the authors' sampler: every epoch is a fresh global permutation of the training TRACKS, each
track gives one crop that may start anywhere in it (across stored chunk edges), and batches are consecutive runs
of that stream, so their composition does not follow TSV order. The stream is a grain `MapDataset`: example k is
a pure function of (seed, k), read at random from the shards through `data_prep.reader`, so a run resumed at any
step sees exactly the batches an uninterrupted run sees, and each process reads only its own share of a batch.

The crops leave the host in the stored float16; every jitted step normalises them with `windowing.model_input`.
Whole-track windows for evaluation and tagging are in `emorf_jax/windowing.py`, which needs no grain. See
docs/architecture.md, "Input pipeline".
"""

import dataclasses
import math
from collections.abc import Iterator

import grain
import jax
import numpy as np

from data_prep.reader import FrameReader, PreparedDataset

TRAIN = "train"


def model_input_shape(prepared: PreparedDataset, frames: int) -> tuple[int, int, int, int]:
    """(1, n_mels, frames, channels): `windowing.model_input` of one window of `frames` frames, to initialise a model
    (Flax takes the stem's input channels from it)."""
    frame_shape = prepared.frame_shape
    return (1, frame_shape[-1], frames, math.prod(frame_shape[:-1]))


def steps_per_epoch(prepared: PreparedDataset, global_batch_size: int) -> float:
    """Optimiser steps per epoch, an epoch being one pass over the training tracks (may be fractional)."""
    num_tracks = len(prepared.parts[TRAIN])
    if num_tracks < global_batch_size:
        raise ValueError(
            f"the training split has {num_tracks} tracks, fewer than one global batch of {global_batch_size}"
        )
    return num_tracks / global_batch_size


@dataclasses.dataclass(frozen=True)
class TrainingCrop(grain.transforms.RandomMap):
    """One training example of a track: a random crop (looped only if the whole track is shorter), circularly
    shifted in time by up to ±max_time_shift frames (the authors' augmentation), in the stored format (the train
    step normalises it with `windowing.model_input`)."""

    reader: FrameReader
    prepared: PreparedDataset
    crop_frames: int
    max_time_shift: int

    def random_map(self, track: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        frames = int(self.prepared.parts[TRAIN].frames[track])
        start = int(rng.integers(0, frames - self.crop_frames + 1)) if frames >= self.crop_frames else 0
        if frames >= self.crop_frames:
            crop = self.reader.read(TRAIN, track, start, start + self.crop_frames)
        else:
            whole = self.reader.read(TRAIN, track)
            crop = np.concatenate([whole] * -(-self.crop_frames // frames))[: self.crop_frames]
        if self.max_time_shift > 0:
            crop = np.roll(crop, int(rng.integers(-self.max_time_shift, self.max_time_shift + 1)), axis=0)
        return {
            "spectrogram": crop,
            "labels": self.prepared.parts[TRAIN].labels[track].astype(np.float32),
            "track": np.int32(track),
            "start": np.int32(start),
        }


def training_examples(
    prepared: PreparedDataset,
    *,
    crop_frames: int,
    max_time_shift: int,
    seed: int,
    reader: FrameReader | None = None,
    verify_checksums: bool = False,
) -> grain.MapDataset:
    """The endless example stream: example k is a crop of track permutation_e[k mod N] with epoch e = k // N.
    `verify_checksums`: each record's checksums are checked on its first read (`FrameReader`), so a damaged shard
    stops training with an error naming it instead of feeding it garbage (`reader`, if given, keeps its own
    setting)."""
    num_tracks = len(prepared.parts[TRAIN])
    crops = TrainingCrop(
        reader or FrameReader(prepared, verify_checksums=verify_checksums), prepared, crop_frames, max_time_shift
    )
    return grain.MapDataset.range(num_tracks).seed(seed).shuffle().repeat(None).random_map(crops)


def _device_layout(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(local_batch, ...) -> (local_devices, per_device, ...) for pmap; keeps only what the step uses."""
    devices = jax.local_device_count()
    return {key: batch[key].reshape((devices, -1) + batch[key].shape[1:]) for key in ("spectrogram", "labels")}


def train_batches(
    prepared: PreparedDataset,
    *,
    global_batch_size: int,
    crop_frames: int,
    max_time_shift: int,
    seed: int,
    start_step: int = 0,
    read_threads: int = 2,
    reader: FrameReader | None = None,
    verify_checksums: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches from `start_step`: stored float16 crops shaped (local_devices, per_device_batch,
    crop_frames, *frame_shape) and labels.

    Step s uses examples [s * B, (s + 1) * B) of the stream (B the global batch); process p reads the p-th
    contiguous share of them. `verify_checksums`: see `training_examples`.
    """
    processes, local_batch = jax.process_count(), global_batch_size // jax.process_count()
    examples = training_examples(
        prepared,
        crop_frames=crop_frames,
        max_time_shift=max_time_shift,
        seed=seed,
        reader=reader,
        verify_checksums=verify_checksums,
    )
    batches = examples.batch(local_batch)[start_step * processes + jax.process_index() :: processes]
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    return iter(batches.map(_device_layout).to_iter_dataset(options))
