"""The stereo feature setting (`hop512_stereo`, the authors' DCASE `d18_stereo` input) end to end: features of real
audio files, shards built by the command and read back, training crops, the model input, and a tiny training run
whose checkpoint tags stereo audio as its evaluation scored it."""

import io

import numpy as np
import pytest
import soundfile

from configs import default
from data_prep import build, features, metadata
from data_prep.reader import FrameReader, load_prepared, time_major
from emorf_jax import checkpoints, input_pipeline, train, windowing
from emorf_jax.tagger import load_tagger

from .conftest import CHUNK_FRAMES

STEREO = features.settings_for("hop512_stereo")
MONO = features.settings_for("hop512")


def _wav(waveform: np.ndarray) -> bytes:
    """A real float32 WAV file (lossless, so that decoding gives back exactly these samples) at 44.1 kHz."""
    out = io.BytesIO()
    soundfile.write(out, waveform, 44100, format="WAV", subtype="FLOAT")
    return out.getvalue()


def _two_different_channels(seconds: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    time = np.arange(int(seconds * 44100)) / 44100
    left = 0.3 * np.sin(2 * np.pi * 440 * time) + 0.05 * rng.standard_normal(time.size)
    right = 0.2 * np.sin(2 * np.pi * 3000 * time) + 0.01 * rng.standard_normal(time.size)
    return np.stack([left, right], axis=1).astype(np.float32)


def test_each_stereo_channel_is_the_mono_features_of_that_channel_alone():
    waveform = _two_different_channels()
    stereo = features.audio_features(_wav(waveform), "song.wav", STEREO)
    alone = [features.audio_features(_wav(waveform[:, k]), f"channel{k}.wav", MONO) for k in (0, 1)]
    assert stereo.shape == (2, 256, alone[0].shape[1]) and stereo.dtype == np.float32
    for channel in (0, 1):
        np.testing.assert_array_equal(stereo[channel], alone[channel])
    assert np.abs(stereo[0] - stereo[1]).max() > 1.0  # the channels differ: 440 Hz against 3 kHz


def test_a_mono_file_gives_two_equal_channels_and_more_than_two_channels_are_refused():
    mono = _two_different_channels()[:, :1]
    stereo = features.audio_features(_wav(mono), "mono.wav", STEREO)
    reference = features.audio_features(_wav(mono), "mono.wav", MONO)
    np.testing.assert_array_equal(stereo, np.stack([reference, reference]))
    three = np.concatenate([_two_different_channels(), mono], axis=1)
    for resample in (False, True):  # no two-channel mix-down is defined, with or without resampling
        with pytest.raises(features.AudioError, match="unexpected channel count 3 in three.wav"):
            features.audio_features(_wav(three), "three.wav", STEREO, resample=resample)
    with pytest.raises(ValueError, match="'npy' input has one channel"):
        features.FeatureSettings(source="npy", mono=False)


@pytest.fixture(scope="module")
def stereo_data_dir(synthetic_tree, tmp_path_factory):
    """The hop512_stereo dataset of the shared synthetic tree (stereo MP3s), built by the command."""
    data_dir = tmp_path_factory.mktemp("stereo")
    build.main(
        [
            f"--audio_dir={synthetic_tree / 'audio'}",
            f"--metadata_dir={synthetic_tree / 'data'}",
            f"--data_dir={data_dir}",
            "--features=hop512_stereo",
            "--workers=2",
            "--no_progress",
            f"--chunk_frames={CHUNK_FRAMES}",
        ]
    )
    return data_dir


def test_stereo_shards_read_back_as_each_channels_features(synthetic_tree, stereo_data_dir):
    prepared = load_prepared(stereo_data_dir, "hop512_stereo")
    assert prepared.frame_shape == (2, 256) and prepared.features["mono"] is False
    reader = FrameReader(prepared)
    tracks = metadata.read_split(synthetic_tree / "data", 0, "test")
    row, track = max(enumerate(tracks), key=lambda item: item[1].duration)
    assert prepared.track_ids["test"][row] == track.track_id
    data = (synthetic_tree / "audio" / track.path).read_bytes()
    direct = features.audio_features(data, track.path, STEREO).astype(np.float16)
    frames = int(prepared.parts["test"].frames[row])
    assert frames == direct.shape[2] > 3 * CHUNK_FRAMES
    whole = reader.read("test", row)
    assert whole.shape == (frames, 2, 256) and whole.dtype == np.float16
    # Within one float16 step: the build's workers run one BLAS thread, this process several (float32 sums in
    # another order can round to the neighbouring float16).
    np.testing.assert_array_max_ulp(whole, time_major(direct), maxulp=1)
    np.testing.assert_array_equal(reader.read("test", row, 150, 330), time_major(direct)[150:330])  # across chunks
    assert np.abs(whole[:, 0].astype(np.float32) - whole[:, 1]).max() > 1.0  # the MP3's channels differ


def test_stereo_statistics_are_per_mel_bin_over_both_channels(stereo_data_dir):
    """As the authors' d18_stereo normalisation: one mean and std per mel bin, pooled over the channels."""
    prepared = load_prepared(stereo_data_dir, "hop512_stereo")
    reader = FrameReader(prepared)
    stored = np.concatenate([reader.read("train", track) for track in range(len(prepared.parts["train"]))])
    pooled = stored.reshape(-1, 256).astype(np.float64)
    assert prepared.mean.shape == prepared.std.shape == (2, 256)
    np.testing.assert_array_equal(prepared.mean[0], prepared.mean[1])
    np.testing.assert_allclose(prepared.mean[0], pooled.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(prepared.std[0], pooled.std(axis=0), rtol=1e-5)


def test_stereo_crops_loop_whole_frames_and_become_two_channel_model_inputs(stereo_data_dir):
    prepared = load_prepared(stereo_data_dir, "hop512_stereo")
    reader = FrameReader(prepared)
    shortest = int(np.argmin(prepared.parts["train"].frames))
    frames = int(prepared.parts["train"].frames[shortest])
    crop = input_pipeline.TrainingCrop(reader, prepared, frames + 50, 0).random_map(shortest, np.random.default_rng(0))
    whole = reader.read("train", shortest)
    np.testing.assert_array_equal(crop["spectrogram"], np.concatenate([whole, whole[:50]]))
    batch = crop["spectrogram"][None]
    model_input = np.asarray(windowing.model_input(batch, prepared.mean, prepared.std))
    assert model_input.shape == input_pipeline.model_input_shape(prepared, frames + 50) == (1, 256, frames + 50, 2)
    for channel in (0, 1):  # each channel normalised as a mono input of that channel's frames
        mono = windowing.model_input(batch[:, :, channel], prepared.mean[channel], prepared.std[channel])
        np.testing.assert_array_equal(model_input[..., channel], np.asarray(mono)[..., 0])


def test_a_stereo_run_trains_and_its_checkpoint_tags_stereo_audio_as_evaluated(
    synthetic_tree, stereo_data_dir, tmp_path
):
    config = default.get_config("test")
    config.dataset.data_dir = str(stereo_data_dir)
    config.dataset.config_name = "hop512_stereo"
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))

    tagger = load_tagger(str(workdir / checkpoints.LATEST))
    assert tagger.meta["features"] == STEREO.to_dict() | {"chunk_frames": CHUNK_FRAMES}
    stem = tagger.members[0].variables["params"]["in_c_conv"]["kernel"]
    assert stem.shape[2] == 2  # the stem reads both channels
    prepared = load_prepared(stereo_data_dir, "hop512_stereo")
    evaluated = np.load(workdir / "report" / "final" / "test_predictions.npy")
    tracks = {track.track_id: track for track in metadata.read_split(synthetic_tree / "data", 0, "test")}
    for row, track_id in enumerate(prepared.track_ids["test"]):
        path = synthetic_tree / "audio" / tracks[track_id].path
        np.testing.assert_allclose(tagger.tag_file(path).probabilities, evaluated[row], rtol=1e-4, atol=1e-6)
    # The tagger computed both channels' features from the file, as the shards store them.
    stored = FrameReader(prepared).read("test", row)
    np.testing.assert_array_max_ulp(time_major(tagger.read_features(path).astype(np.float16)), stored, maxulp=1)
