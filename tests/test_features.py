"""The fast float32 features against librosa's reference pipeline, and their input checks."""

import io

import librosa
import numpy as np
import pytest
import soundfile

from data_prep import features

SAMPLE_RATE = 44100


def _stereo_signal(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """A tone plus noise, with a near-silent start so that the 80 dB floor is exercised."""
    rng = np.random.default_rng(seed)
    time = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    left = 0.3 * np.sin(2 * np.pi * 440 * time) + 0.05 * rng.standard_normal(time.size)
    right = 0.2 * np.sin(2 * np.pi * 3000 * time) + 0.02 * rng.standard_normal(time.size)
    signal = np.stack([left, right], axis=1).astype(np.float32)
    signal[: SAMPLE_RATE // 2] *= 1e-5
    return signal


def _librosa_reference(mono: np.ndarray, hop_length: int, order: str) -> np.ndarray:
    magnitude = np.abs(librosa.stft(mono, n_fft=2048, hop_length=hop_length, center=True, pad_mode="reflect"))
    if order == "weighted_db_then_mel":
        frequencies = librosa.fft_frequencies(sr=SAMPLE_RATE, n_fft=2048)
        with np.errstate(divide="ignore"):  # librosa's A-weighting takes log10(0) at 0 Hz, then clips it
            weighted = librosa.perceptual_weighting(magnitude**2, frequencies, ref=1.0, amin=1e-10, top_db=80)
        return librosa.feature.melspectrogram(S=weighted, sr=SAMPLE_RATE, n_mels=256)
    mel_power = librosa.feature.melspectrogram(S=magnitude**2, sr=SAMPLE_RATE, n_mels=256)
    return librosa.power_to_db(mel_power, ref=1.0, amin=1e-10, top_db=80)


@pytest.mark.parametrize("hop_length", [512, 1536])
@pytest.mark.parametrize("order", features.ORDERS)
def test_spectrogram_equals_librosa_reference(hop_length, order):
    signal = _stereo_signal()
    fast = features.spectrogram(signal, SAMPLE_RATE, hop_length=hop_length, order=order)
    reference = _librosa_reference(librosa.to_mono(signal.T), hop_length, order)
    assert fast.dtype == np.float32
    assert fast.shape == reference.shape == (256, 1 + signal.shape[0] // hop_length)
    scale = np.abs(reference).max()
    np.testing.assert_allclose(fast, reference, rtol=0, atol=2e-5 * scale)


def test_mono_input_equals_its_two_channel_copy():
    mono = _stereo_signal()[:, 0]
    np.testing.assert_array_equal(
        features.spectrogram(mono, SAMPLE_RATE), features.spectrogram(np.stack([mono, mono], axis=1), SAMPLE_RATE)
    )


@pytest.mark.parametrize(
    "waveform, message",
    [
        (np.zeros((0,), np.float32), "empty"),
        (np.zeros((2, 3, 4), np.float32), "shape"),
        (np.full(5000, np.nan, np.float32), "NaN"),
        (np.zeros(100, np.float32), "samples"),
    ],
)
def test_bad_waveform_is_a_clear_error(waveform, message):
    with pytest.raises(ValueError, match=message):
        features.spectrogram(waveform, SAMPLE_RATE)


def test_unknown_order_is_named():
    with pytest.raises(ValueError, match="'power_first'"):
        features.spectrogram(_stereo_signal(), SAMPLE_RATE, order="power_first")


def _encoded(signal: np.ndarray, sample_rate: int, file_format: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, signal, sample_rate, format=file_format)
    return buffer.getvalue()


def test_mp3_features_equal_the_spectrogram_of_the_decoded_audio():
    data = _encoded(_stereo_signal(), SAMPLE_RATE, "MP3")
    decoded, sample_rate = soundfile.read(io.BytesIO(data), dtype="float32")
    values = features.audio_features(data, "x.mp3", features.FeatureSettings())
    np.testing.assert_array_equal(values, features.spectrogram(decoded, sample_rate))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"ID3\x03\x00garbage" * 100, "cannot decode"),
        (_encoded(_stereo_signal(1.0), 48000, "WAV"), "sample rate 48000"),
        (_encoded(np.zeros((SAMPLE_RATE, 3), np.float32), SAMPLE_RATE, "WAV"), "channel count 3"),
    ],
)
def test_bad_audio_file_is_an_audio_error(data, message):
    with pytest.raises(features.AudioError, match=message):
        features.audio_features(data, "48/948.mp3", features.FeatureSettings())


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_npy_features_pass_the_organisers_mels_through():
    settings = features.settings_for("essentia96")
    mels = np.random.default_rng(0).normal(size=(96, 50)).astype(np.float64)
    values = features.track_features(_npy_bytes(mels), "48/948.npy", settings)
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, mels.astype(np.float32))


@pytest.mark.parametrize(
    "data, message",
    [
        (_npy_bytes(np.zeros((128, 50))), r"shape \(128, 50\)"),
        (_npy_bytes(np.full((96, 5), np.inf)), "finite"),
        (b"not numpy", "cannot read"),
    ],
)
def test_bad_npy_file_is_an_audio_error(data, message):
    with pytest.raises(features.AudioError, match=message):
        features.npy_features(data, "48/948.npy", features.settings_for("essentia96"))


def test_settings_reject_bad_fields_by_name():
    with pytest.raises(ValueError, match="order='loud'"):
        features.FeatureSettings(order="loud")
    with pytest.raises(ValueError, match="hop_length=0"):
        features.FeatureSettings(hop_length=0)
    with pytest.raises(ValueError, match="'hop999'"):
        features.settings_for("hop999")


def test_source_path_of_npy_input_is_beside_the_mp3_stem():
    assert features.source_path("48/948.mp3", features.settings_for("essentia96")) == "48/948.npy"
    assert features.source_path("48/948.mp3", features.settings_for("hop512")) == "48/948.mp3"


def test_other_rates_and_channel_counts_are_resampled_and_mixed_down_only_when_asked():
    settings = features.FeatureSettings()
    time = np.arange(3 * 48000) / 48000
    tone = (0.3 * np.sin(2 * np.pi * 1000 * time)).astype(np.float32)
    quad = np.stack([tone, tone, 0.5 * tone, 0.5 * tone], axis=1)
    with pytest.raises(features.AudioError, match="unexpected sample rate 48000 Hz in song.wav"):
        features.waveform_features(quad, 48000, "song.wav", settings)
    resampled = features.waveform_features(quad, 48000, "song.wav", settings, resample=True)
    native_time = np.arange(3 * 44100) / 44100
    native = features.spectrogram(0.75 * 0.3 * np.sin(2 * np.pi * 1000 * native_time), 44100)
    assert resampled.shape == native.shape
    # The same tone: equal features away from the edges, to a small fraction of their range.
    inner = slice(10, -10)
    assert np.abs(resampled[:, inner] - native[:, inner]).max() < 0.01 * np.ptp(native)
