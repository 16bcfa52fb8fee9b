"""Stored features into the model: the on-device normalisation (`model_input`) that every jitted step applies, and
the whole-track windows that evaluation and tagging share.

A whole track is cut into fixed-length windows (`window_ranges`, the last aligned to the track's end) whose logits
are averaged, weighted by the new frames each window adds. Evaluation reads them from the shards in a schedule of
global batches that every process computes alike (`eval_schedule`, `eval_batches`); tagging cuts a file's features
the same way. This module imports no training loader (grain), so that tagging needs only the plain install. See
docs/architecture.md, "Evaluation and tagging".
"""

import dataclasses
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from data_prep.reader import STORED_DTYPE, FrameReader, PreparedDataset


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
