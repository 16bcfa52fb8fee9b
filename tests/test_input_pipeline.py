"""The input pipeline on real shards of multi-chunk tracks: per-track epochs, crops across chunk edges, windows."""

import jax
import numpy as np
import pytest

from data_prep.reader import FrameReader, load_prepared
from emorf_jax import input_pipeline, windowing

from .conftest import CHUNK_FRAMES

CROP = 64


@pytest.fixture(scope="module")
def prepared(prepared_data_dir):
    return load_prepared(*prepared_data_dir)


def _whole_track(prepared, track: int) -> np.ndarray:
    """The stored (frames, n_mels) float16 frames of a whole training track."""
    return FrameReader(prepared).read("train", track)


def test_model_input_normalises_and_transposes_stored_frames_on_the_device(prepared):
    stored = np.stack([FrameReader(prepared).read("train", track, 0, CROP) for track in (0, 1)])
    inputs = np.asarray(jax.jit(windowing.model_input)(stored, prepared.mean, prepared.std))
    assert stored.dtype == np.float16 and inputs.dtype == np.float32 and inputs.shape == (2, 256, CROP, 1)
    expected = (stored.astype(np.float32) - prepared.mean) / prepared.std  # per mel band, in float32
    np.testing.assert_allclose(inputs[..., 0], np.swapaxes(expected, 1, 2), rtol=3e-7, atol=1e-7)  # to 1-2 ulp
    assert abs(float(inputs.mean())) < 1 and 0.3 < float(inputs.std()) < 3  # normalised


def test_every_training_track_is_drawn_once_per_epoch(prepared):
    examples = input_pipeline.training_examples(prepared, crop_frames=CROP, max_time_shift=8, seed=3)
    num_tracks = len(prepared.parts["train"])
    drawn = [int(examples[k]["track"]) for k in range(3 * num_tracks)]
    epochs = [drawn[e * num_tracks : (e + 1) * num_tracks] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(num_tracks))
    assert epochs[0] != epochs[1] != epochs[2]  # a new order every epoch
    assert epochs[0] != sorted(epochs[0])  # not the TSV order


def test_crops_start_anywhere_in_the_track_and_cross_chunk_edges(prepared):
    examples = input_pipeline.training_examples(prepared, crop_frames=CROP, max_time_shift=0, seed=0)
    num_tracks = len(prepared.parts["train"])
    crossing, starts_past_first_chunk = 0, 0
    for k in range(4 * num_tracks):
        example = examples[k]
        track, start = int(example["track"]), int(example["start"])
        whole = _whole_track(prepared, track)
        np.testing.assert_array_equal(example["spectrogram"], whole[start : start + CROP])
        np.testing.assert_array_equal(example["labels"], prepared.parts["train"].labels[track])
        crossing += start // CHUNK_FRAMES != (start + CROP - 1) // CHUNK_FRAMES
        starts_past_first_chunk += start >= CHUNK_FRAMES
    assert crossing >= 5 and starts_past_first_chunk >= 5


def test_only_a_track_shorter_than_the_crop_is_looped(prepared):
    frames = prepared.parts["train"].frames
    crop = int(np.sort(frames)[1]) + 1  # longer than the two shortest tracks only
    examples = input_pipeline.training_examples(prepared, crop_frames=crop, max_time_shift=0, seed=0)
    looped = 0
    for k in range(len(frames)):
        example = examples[k]
        whole = _whole_track(prepared, int(example["track"]))
        if whole.shape[0] < crop:
            np.testing.assert_array_equal(example["spectrogram"], np.tile(whole, (2, 1))[:crop])
            looped += 1
        else:
            start = int(example["start"])
            np.testing.assert_array_equal(example["spectrogram"], whole[start : start + crop])
    assert looped == 2


def test_a_training_example_reads_exactly_its_crop(prepared):
    reader = FrameReader(prepared)
    examples = input_pipeline.training_examples(prepared, crop_frames=CROP, max_time_shift=8, seed=1, reader=reader)
    for k in range(20):
        examples[k]
    assert reader.bytes_read == 20 * CROP * prepared.features["n_mels"] * 2


def test_a_resumed_stream_continues_the_batches_of_an_uninterrupted_one(prepared):
    def batches(start_step, count):
        stream = input_pipeline.train_batches(
            prepared, global_batch_size=4, crop_frames=CROP, max_time_shift=8, seed=5, start_step=start_step
        )
        return [next(stream) for _ in range(count)]

    uninterrupted = batches(0, 7)
    resumed = batches(4, 3)
    devices = jax.local_device_count()
    assert uninterrupted[0]["spectrogram"].shape == (devices, 4 // devices, CROP, 256)
    assert uninterrupted[0]["spectrogram"].dtype == np.float16  # the stored format: half the bytes to send
    for got, want in zip(resumed, uninterrupted[4:]):
        for key in ("spectrogram", "labels"):
            np.testing.assert_array_equal(got[key], want[key])
    assert not np.array_equal(uninterrupted[0]["spectrogram"], uninterrupted[1]["spectrogram"])


@pytest.mark.parametrize("frames, window", [(517, 128), (512, 128), (128, 128), (90, 128), (1000, 999)])
def test_windows_cover_the_track_once_by_weight(frames, window):
    ranges = windowing.window_ranges(frames, window)
    assert sum(weight for _, _, weight in ranges) == frames
    covered = np.zeros(frames, int)
    for start, stop, weight in ranges:
        assert 0 <= start < stop <= frames
        assert stop - start == min(window, frames)  # shorter than a window only when the whole track is
        covered[stop - weight : stop] += 1  # the frames a window adds are its last `weight` frames
    assert np.all(covered == 1)


def test_evaluation_windows_join_chunks_and_cover_whole_tracks(prepared):
    window = 128
    reader = FrameReader(prepared)
    schedule = windowing.eval_schedule(prepared.parts["test"].frames, window, global_batch_size=4)
    seen: dict[int, int] = {}
    for batch in windowing.eval_batches(prepared, "test", schedule):
        inputs = batch.spectrograms.reshape((-1,) + batch.spectrograms.shape[2:])
        for item, spectrogram in zip(batch.windows, inputs):
            if item.weight == 0:  # padding
                assert not spectrogram.any()
                continue
            number = seen[item.track_index] = seen.get(item.track_index, -1) + 1  # a track's windows in order
            whole = reader.read("test", item.track_index)
            start, stop, weight = windowing.window_ranges(whole.shape[0], window)[number]
            assert (item.start, item.stop, item.weight) == (start, stop, weight)
            np.testing.assert_array_equal(spectrogram, whole[start:stop])
    frames = prepared.parts["test"].frames
    assert all(
        seen[track] + 1 == len(windowing.window_ranges(int(frames[track]), window)) for track in range(len(frames))
    )
    assert max(seen.values()) >= 3  # tracks longer than several windows and chunks


def test_every_process_makes_the_same_evaluation_calls_and_together_they_cover_every_window(prepared):
    """JAX's multi-process runtime needs the same pmapped calls, with the same shapes, on every process."""
    frames = prepared.parts["validation"].frames
    schedule = windowing.eval_schedule(frames, 128, global_batch_size=4)
    shares = [
        list(windowing.eval_batches(prepared, "validation", schedule, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(shares[0]) == len(shares[1]) == len(schedule)
    for first, second, batch in zip(*shares, schedule):
        assert first.spectrograms.shape == second.spectrograms.shape
        assert first.windows + second.windows == tuple(batch)  # contiguous halves, in device order
        assert len({w.stop - w.start for w in batch}) == 1  # one window length per batch
    real = [(w.track_index, w.start, w.stop) for batch in schedule for w in batch if w.weight > 0]
    assert sorted(real) == [
        (track, start, stop)
        for track, length in enumerate(frames)
        for start, stop, _ in windowing.window_ranges(int(length), 128)
    ]
