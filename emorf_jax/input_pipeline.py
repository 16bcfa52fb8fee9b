"""Prepared data -> training batches (one crop per track per epoch) and whole-track evaluation windows.

Training follows the authors' sampler: every epoch is a fresh global permutation of the training TRACKS, each
track gives one crop that may start anywhere in it (across stored chunk edges), and batches are consecutive runs
of that stream, so their composition does not follow TSV order. The stream is a grain `MapDataset`: example k is
a pure function of (seed, k), read at random from the shards through `data_prep.reader`, so a run resumed at any
step sees exactly the batches an uninterrupted run sees, and each process reads only its own share of a batch.

Evaluation and tagging share `window_ranges`: a whole track is cut into fixed-length windows (the last aligned to
the track's end) whose logits are averaged, weighted by the new frames each window adds. See
docs/architecture.md, "Input pipeline".
"""

import dataclasses
import math
from collections.abc import Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np

from data_prep.reader import STORED_DTYPE, FrameReader, PreparedDataset

TRAIN = "train"


def model_input(stored: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Stored features, time-major float16 (..., frames, n_mels), or (..., frames, channels, n_mels) for a stereo
    setting -> the model's normalised float32 NHWC (..., n_mels, frames, channels), channels 1 for mono. The
    statistics have the shape of one stored frame, (n_mels,) or (channels, n_mels), which says the layout.

    Every jitted step calls it (training, BatchNorm re-estimation, evaluation, tagging), so the host only slices
    and batches the stored float16 frames: half the bytes of float32 to send, and no conversion on the host, where
    numpy converts half floats element by element (docs/architecture.md, "Input pipeline").
    """
    normalised = (jnp.asarray(stored, jnp.float32) - mean) / std
    if jnp.ndim(mean) == 1:
        normalised = normalised[..., None, :]
    return jnp.moveaxis(normalised, -1, -3)


def model_input_shape(prepared: PreparedDataset, frames: int) -> tuple[int, int, int, int]:
    """(1, n_mels, frames, channels): `model_input` of one window of `frames` frames, to initialise a model (Flax
    takes the stem's input channels from it)."""
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
    step normalises it with `model_input`)."""

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
    prepared: PreparedDataset, *, crop_frames: int, max_time_shift: int, seed: int, reader: FrameReader | None = None
) -> grain.MapDataset:
    """The endless example stream: example k is a crop of track permutation_e[k mod N] with epoch e = k // N."""
    num_tracks = len(prepared.parts[TRAIN])
    crops = TrainingCrop(reader or FrameReader(prepared), prepared, crop_frames, max_time_shift)
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
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches from `start_step`: stored float16 crops shaped (local_devices, per_device_batch,
    crop_frames, *frame_shape) and labels.

    Step s uses examples [s * B, (s + 1) * B) of the stream (B the global batch); process p reads the p-th
    contiguous share of them.
    """
    processes, local_batch = jax.process_count(), global_batch_size // jax.process_count()
    examples = training_examples(
        prepared, crop_frames=crop_frames, max_time_shift=max_time_shift, seed=seed, reader=reader
    )
    batches = examples.batch(local_batch)[start_step * processes + jax.process_index() :: processes]
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
    return iter(batches.map(_device_layout).to_iter_dataset(options))


def window_ranges(frames: int, window_frames: int) -> list[tuple[int, int, int]]:
    """(start, stop, weight) of the windows that cover a track of `frames` frames.

    Windows of exactly `window_frames` tile the track; the last one is aligned to the track's end (overlapping its
    predecessor) and weighs only the frames it adds. Only a track shorter than one window gets a shorter window:
    the whole track, never looped.
    """
    if frames <= window_frames:
        return [(0, frames, frames)]
    ranges = []
    for start in range(0, frames, window_frames):
        stop = min(start + window_frames, frames)
        ranges.append((stop - window_frames, stop, stop - start))
    return ranges


@dataclasses.dataclass(frozen=True)
class EvalWindow:
    """One model input of an evaluated track, and how much of the track it stands for (0: padding)."""

    track_index: int  # position in the split's track list
    start: int
    stop: int
    weight: float  # frames of the track this window accounts for


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    spectrograms: np.ndarray  # stored float16 (local_devices, per_device, frames, *frame_shape)
    windows: tuple[EvalWindow, ...]  # this process's share of the global batch, in device order


def eval_schedule(frames: np.ndarray, window_frames: int, global_batch_size: int) -> list[list[EvalWindow]]:
    """The global batches that evaluate every window of tracks of `frames` frames: windows of equal length in
    track order, a batch left incomplete padded with zero-weight windows. Only tracks shorter than a window make
    windows of other lengths.

    A pure function of the record index, so every process computes the same schedule and runs the same number of
    pmapped calls with the same shapes, as JAX's multi-process runtime requires (docs/architecture.md).
    """
    batches, pending = [], {}
    for track, length in enumerate(frames):
        for start, stop, weight in window_ranges(int(length), window_frames):
            group = pending.setdefault(stop - start, [])
            group.append(EvalWindow(track, start, stop, float(weight)))
            if len(group) == global_batch_size:
                batches.append(list(group))
                group.clear()
    for group in pending.values():
        if group:
            padding = dataclasses.replace(group[0], weight=0.0)
            batches.append(group + [padding] * (global_batch_size - len(group)))
    return batches


def eval_batches(
    prepared: PreparedDataset,
    split: str,
    schedule: list[list[EvalWindow]],
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[EvalBatch]:
    """This process's contiguous share of every batch of `schedule` in the stored format, each window read from the
    shards on its own, so memory stays bounded whatever a track's length; padding is zeros."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    reader = FrameReader(prepared)
    try:
        for batch in schedule:
            share = len(batch) // process_count
            windows = tuple(batch[process_index * share : (process_index + 1) * share])
            spectrograms = np.stack(
                [
                    reader.read(split, w.track_index, w.start, w.stop)
                    if w.weight > 0
                    else np.zeros((w.stop - w.start, *prepared.frame_shape), STORED_DTYPE)
                    for w in windows
                ]
            )
            yield EvalBatch(spectrograms.reshape((jax.local_device_count(), -1) + spectrograms.shape[1:]), windows)
    finally:
        reader.close()
