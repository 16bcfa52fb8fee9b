"""Prepared TFRecord shards -> normalised training crops and whole-track evaluation windows.

Training is a tf.data pipeline that is a pure function of (seed, epoch): shard order, shuffle buffer, crops and
shifts are all seeded per epoch, so a resumed run sees exactly the batches an uninterrupted run would have seen.
Evaluation streams chunks in any order and cuts each into fixed-length windows, so one compiled shape serves every
track and memory stays bounded whatever a track's length.
"""

from collections.abc import Iterator
import dataclasses

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_prep.builder import PreparedDataset, training_read_config

# tf.data must not grab the accelerators JAX uses.
tf.config.set_visible_devices([], "GPU")


def normalise(spectrogram, mean, std):
    """Per-mel-bin standardisation with the training-set statistics; works on tf and numpy (n_mels, frames)."""
    return (spectrogram - mean[:, None]) / std[:, None]


def _tile_to_length(spectrogram: tf.Tensor, frames: int) -> tf.Tensor:
    """Repeats a spectrogram shorter than `frames` along time (wrap padding), so short tracks still give crops."""
    length = tf.shape(spectrogram)[1]
    repeats = (frames + length - 1) // length
    return tf.tile(spectrogram, [1, repeats])


def _random_crop_and_shift(spectrogram, crop_frames: int, max_shift: int, seed):
    spectrogram = _tile_to_length(spectrogram, crop_frames)
    length = tf.shape(spectrogram)[1]
    crop_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    start = tf.random.stateless_uniform([], crop_seed, 0, length - crop_frames + 1, dtype=tf.int32)
    crop = spectrogram[:, start:start + crop_frames]
    if max_shift > 0:
        shift = tf.random.stateless_uniform([], shift_seed, -max_shift, max_shift + 1, dtype=tf.int32)
        crop = tf.roll(crop, shift, axis=1)
    return crop


def steps_per_epoch(prepared: PreparedDataset, global_batch_size: int) -> int:
    """Optimiser steps per pass over the training chunks; every host takes the same number of steps."""
    per_process = prepared.num_examples["train"] // jax.process_count()
    steps = per_process // (global_batch_size // jax.process_count())
    if steps < 1:
        raise ValueError(
            f"the training split has {prepared.num_examples['train']} examples, fewer than one global batch of "
            f"{global_batch_size}")
    return steps


def _train_epoch_dataset(prepared: PreparedDataset, *, epoch: int, seed: int, crop_frames: int,
                         max_time_shift: int, shuffle_buffer: int, local_batch_size: int,
                         num_steps: int) -> tf.data.Dataset:
    epoch_seed = seed * 1_000_003 + epoch
    dataset = prepared.builder.as_dataset(
        split=tfds.split_for_jax_process("train", drop_remainder=True),
        shuffle_files=True,
        read_config=training_read_config(epoch_seed),
    )
    dataset = dataset.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    mean = tf.constant(prepared.mean, tf.float32)
    std = tf.constant(prepared.std, tf.float32)

    def make_example(index, example):
        spectrogram = normalise(tf.cast(example["spectrogram"], tf.float32), mean, std)
        seed_pair = tf.stack([tf.constant(epoch_seed, tf.int64), index])
        crop = _random_crop_and_shift(spectrogram, crop_frames, max_time_shift, seed_pair)
        return {"spectrogram": crop[..., None], "labels": tf.cast(example["labels"], tf.float32)}

    dataset = dataset.enumerate().map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(local_batch_size, drop_remainder=True).take(num_steps)


def train_batches(prepared: PreparedDataset, *, global_batch_size: int, crop_frames: int, max_time_shift: int,
                  shuffle_buffer: int, seed: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches shaped (local_devices, per_device_batch, n_mels, crop_frames, 1), from `start_step`.

    The stream is the same whether a run starts at step 0 or resumes at `start_step`: a resumed epoch is rebuilt
    from its seed and the batches already consumed are skipped.
    """
    if crop_frames > prepared.chunk_frames:
        raise ValueError(f"crop_frames {crop_frames} exceeds the dataset's chunk length {prepared.chunk_frames}")
    local_devices = jax.local_device_count()
    local_batch_size = global_batch_size // jax.process_count()
    per_device = local_batch_size // local_devices
    num_steps = steps_per_epoch(prepared, global_batch_size)
    epoch, skip = divmod(start_step, num_steps)
    while True:
        dataset = _train_epoch_dataset(
            prepared, epoch=epoch, seed=seed, crop_frames=crop_frames, max_time_shift=max_time_shift,
            shuffle_buffer=shuffle_buffer, local_batch_size=local_batch_size, num_steps=num_steps)
        for batch in tfds.as_numpy(dataset.skip(skip).prefetch(2)):
            yield {key: value.reshape((local_devices, per_device) + value.shape[1:]) for key, value in batch.items()}
        epoch, skip = epoch + 1, 0


@dataclasses.dataclass(frozen=True)
class EvalWindow:
    """One model input of an evaluated track, and how much of the track it stands for."""

    spectrogram: np.ndarray  # (n_mels, window_frames, 1), normalised
    track_index: int  # position in PreparedDataset.track_ids[split]
    weight: float  # frames of the track this window accounts for
    labels: np.ndarray  # (num_tags,) bool, the track's tags


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    spectrograms: np.ndarray  # (local_devices, per_device, n_mels, window_frames, 1)
    track_indices: np.ndarray  # (local_batch,)
    weights: np.ndarray  # (local_batch,); 0 for padding
    labels: np.ndarray  # (local_batch, num_tags) bool


def split_into_windows(spectrogram: np.ndarray, window_frames: int) -> list[tuple[np.ndarray, int]]:
    """Cuts (n_mels, frames) into windows of exactly `window_frames`, each with the count of frames it stands for.

    Consecutive windows tile the input; the last one is aligned to the end (overlapping its predecessor) and counts
    only its new frames. Input shorter than one window is wrapped to the window length and counts its true length.
    """
    frames = spectrogram.shape[1]
    if frames < window_frames:
        repeats = -(-window_frames // frames)
        return [(np.tile(spectrogram, (1, repeats))[:, :window_frames], frames)]
    windows = []
    for start in range(0, frames, window_frames):
        end = min(start + window_frames, frames)
        windows.append((spectrogram[:, end - window_frames:end], end - start))
    return windows


def eval_windows(prepared: PreparedDataset, split: str, window_frames: int) -> Iterator[EvalWindow]:
    """Every window of every track of `split` on this host, normalised, in shard order."""
    index_of = {track_id: i for i, track_id in enumerate(prepared.track_ids[split])}
    dataset = prepared.builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=False)
    for example in tfds.as_numpy(dataset.prefetch(4)):
        spectrogram = normalise(example["spectrogram"].astype(np.float32), prepared.mean, prepared.std)
        track_index = index_of[example["track_id"].decode()]
        for window, weight in split_into_windows(spectrogram, window_frames):
            yield EvalWindow(window[..., None], track_index, float(weight), example["labels"])


def eval_batches(windows: Iterator[EvalWindow], global_batch_size: int) -> Iterator[EvalBatch]:
    """Groups windows into per-device batches; the last batch is padded with zero-weight windows."""
    local_devices = jax.local_device_count()
    local_batch_size = global_batch_size // jax.process_count()
    per_device = local_batch_size // local_devices
    pending: list[EvalWindow] = []

    def emit(items: list[EvalWindow]) -> EvalBatch:
        padding = [dataclasses.replace(items[0], weight=0.0)] * (local_batch_size - len(items))
        items = items + padding
        spectrograms = np.stack([w.spectrogram for w in items])
        return EvalBatch(spectrograms.reshape((local_devices, per_device) + spectrograms.shape[1:]),
                         np.array([w.track_index for w in items]), np.array([w.weight for w in items], np.float32),
                         np.stack([w.labels for w in items]))

    for window in windows:
        pending.append(window)
        if len(pending) == local_batch_size:
            yield emit(pending)
            pending = []
    if pending:
        yield emit(pending)
