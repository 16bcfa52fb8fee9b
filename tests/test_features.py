"""The fast float32 features against librosa's reference pipeline, and their input checks."""

import io
import os
import shutil
import subprocess

import librosa
import numpy as np
import pytest
import scipy.fft
import soundfile

from data_prep import features
from data_prep.reader import STORED_DTYPE

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


@pytest.mark.parametrize(
    "sample_rate, n_fft, n_mels", [(44100, 2048, 256), (44100, 2048, 128), (22050, 1024, 64), (12000, 512, 96)]
)
def test_mel_filterbank_equals_librosa_s_to_the_bit(sample_rate, n_fft, n_mels):
    np.testing.assert_array_equal(
        features._mel_filterbank(sample_rate, n_fft, n_mels),
        librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, dtype=np.float32),
    )


def _dense_float64_formula(mono: np.ndarray, hop_length: int, order: str) -> np.ndarray:
    """The features by the recipe's formula in float64 from the float32 power spectra: dB floored at the track's
    peak minus 80 dB, plus the A-weighting, times the dense mel matrix (or the mel power, then its dB)."""
    padded = np.pad(mono, 1024, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, 2048)[::hop_length] * features._hann_window(2048)
    spectrum = scipy.fft.rfft(frames, axis=-1)
    power = (np.square(spectrum.real) + np.square(spectrum.imag)).astype(np.float64)
    mel = features._mel_filterbank(SAMPLE_RATE, 2048, 256).astype(np.float64)

    def db(values: np.ndarray) -> np.ndarray:
        return 10.0 * np.log10(np.maximum(values, max(features.AMIN, values.max() * 1e-8)))

    if order == "weighted_db_then_mel":
        return mel @ (db(power) + features._a_weighting_db(SAMPLE_RATE, 2048)).T
    return db(mel @ power.T)


@pytest.mark.parametrize("hop_length", [512, 1536])
@pytest.mark.parametrize("order", features.ORDERS)
def test_spectrogram_equals_the_dense_float64_formula_to_float32_rounding(hop_length, order):
    """The sparse projection of natural-log dB gives the features of the dense formula within 1e-4 dB, and at
    least 99.9 % of them are the same once stored as float16."""
    mono = features.to_mono(_stereo_signal(30.0))
    fast = features.spectrogram(mono, SAMPLE_RATE, hop_length=hop_length, order=order)
    reference = _dense_float64_formula(mono, hop_length, order)
    assert fast.dtype == np.float32 and fast.shape == reference.shape
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-4)
    stored_equal = fast.astype(STORED_DTYPE) == reference.astype(STORED_DTYPE)
    assert stored_equal.mean() >= 0.999, stored_equal.mean()


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


def _encoded(signal: np.ndarray, sample_rate: int, file_format: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, signal, sample_rate, format=file_format, subtype=subtype)
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


@pytest.fixture
def without_ffmpeg(tmp_path, monkeypatch) -> None:
    """A PATH on which no ffmpeg is found: only libsndfile decodes."""
    (tmp_path / "empty_bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))


@pytest.fixture
def ffmpeg(tmp_path, monkeypatch) -> str:
    """An ffmpeg on the PATH: the system's, or the binary the test install brings (imageio-ffmpeg), linked as
    `ffmpeg` in a folder put first on the PATH."""
    if shutil.which("ffmpeg"):
        return shutil.which("ffmpeg")
    imageio_ffmpeg = pytest.importorskip(
        "imageio_ffmpeg", reason="no ffmpeg on the PATH and imageio-ffmpeg not installed (pip install -e '.[test]')"
    )
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "ffmpeg").symlink_to(imageio_ffmpeg.get_ffmpeg_exe())
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return shutil.which("ffmpeg")


def _snr_db(decoded: np.ndarray, source: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(source**2) / np.sum((decoded - source) ** 2)))


@pytest.mark.parametrize(
    "file_format, subtype, sample_rate, lossless",
    [
        ("WAV", "FLOAT", 44100, True),
        ("FLAC", "PCM_16", 44100, True),
        ("AIFF", "PCM_16", 22050, True),
        ("OGG", "VORBIS", 44100, False),
        ("OGG", "OPUS", 48000, False),  # Opus runs at 48 kHz (or 8-24 kHz)
    ],
)
def test_each_format_libsndfile_writes_decodes_to_its_source(
    file_format, subtype, sample_rate, lossless, without_ffmpeg
):
    source = _stereo_signal(2.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, source, sample_rate, format=file_format, subtype=subtype)
    decoded, decoded_rate = features.decode_audio(buffer.getvalue(), f"song.{file_format.lower()}")
    assert decoded_rate == sample_rate and decoded.shape == source.shape and decoded.dtype == np.float32
    if lossless:  # exact up to the subtype's quantisation: 16-bit steps are 2**-15
        np.testing.assert_allclose(decoded, source, atol=2**-15 if subtype == "PCM_16" else 0)
    else:
        assert _snr_db(decoded[SAMPLE_RATE:], source[SAMPLE_RATE:]) > 10  # the loud second, past the quiet start


def test_without_ffmpeg_an_unreadable_file_names_itself_and_says_to_install_ffmpeg(without_ffmpeg):
    with pytest.raises(features.AudioError, match=r"cannot decode music/song\.m4a: .*install ffmpeg"):
        features.decode_audio(b"\x00\x00\x00\x20ftypM4A " + bytes(2000), "music/song.m4a")


def test_ffmpeg_decodes_what_libsndfile_cannot_read(ffmpeg, tmp_path):
    source = _stereo_signal(2.0)
    soundfile.write(tmp_path / "source.flac", source, SAMPLE_RATE, subtype="PCM_16")
    quantised = soundfile.read(tmp_path / "source.flac", dtype="float32")[0]
    for name, codec in [("song.mka", "flac"), ("song.m4a", "aac")]:  # Matroska FLAC is lossless, AAC is not
        encoded = tmp_path / name
        subprocess.run([ffmpeg, "-v", "error", "-i", tmp_path / "source.flac", "-c:a", codec, encoded], check=True)
        with pytest.raises(soundfile.LibsndfileError):
            soundfile.read(encoded)
        decoded, sample_rate = features.decode_audio(encoded.read_bytes(), name)
        assert sample_rate == SAMPLE_RATE and decoded.shape[1] == 2 and decoded.dtype == np.float32
        if codec == "flac":
            np.testing.assert_array_equal(decoded, quantised)
        else:  # the encoder's delay is trimmed on decoding: the samples line up with the source's
            assert abs(len(decoded) - len(source)) < 1024
            length = min(len(decoded), len(source))
            assert _snr_db(decoded[SAMPLE_RATE:length], source[SAMPLE_RATE:length]) > 10
    with pytest.raises(features.AudioError, match=r"cannot decode music/notes\.m4a: libsndfile: .+; ffmpeg: .+"):
        features.decode_audio(b"not audio at all" * 100, "music/notes.m4a")


def _streamed(path, settings, **options) -> np.ndarray:
    """The features of a file computed in blocks (`FileFeatures`), put together."""
    with features.AudioFile(path, str(path)) as audio:
        return np.concatenate(list(features.FileFeatures(audio, settings, **options).blocks()), axis=-1)


# Decoded blocks of 1,000 samples: shorter than the half frame (1,024) that the start's reflection needs, not a
# multiple of the hop, and many per frame of 2,048, so that every frame spans several blocks. A buffer of 40 KB
# holds a few frames' power spectra only: the file is decoded a second time once its peak is known.
SMALL_BLOCKS = {"block_frames": 1000, "buffer_bytes": 40_000}


@pytest.mark.parametrize(
    "config, sample_rate, channels",
    [
        ("hop512", 44100, 2),
        ("hop512_logmel", 44100, 1),
        ("hop1536", 44100, 2),  # a hop shorter than the half frame: the end's reflection from the samples kept
        ("hop512", 48000, 2),  # resampled in blocks
        ("hop512", 8000, 1),
        ("hop512_stereo", 44100, 2),
        ("hop512_stereo", 22050, 1),  # a mono file's one channel twice, resampled
    ],
)
@pytest.mark.parametrize("options", [SMALL_BLOCKS, {"block_frames": 4096}], ids=["two_decodes", "one_decode"])
def test_features_in_blocks_equal_the_whole_track_computation(tmp_path, config, sample_rate, channels, options):
    """Decoded, resampled, framed and computed in blocks, a file's features equal `waveform_features` of its whole
    waveform to the bit, at every frame: those whose STFT frame spans a block edge, the reflect-padded first and
    last frames, and across the resampler's blocks (its length fixed at the end as librosa's)."""
    settings = features.settings_for(config)
    signal = _stereo_signal(13.0)[:, :channels]  # 1,120 frames at hop 512: past the first block of 1,024
    signal = (
        librosa.resample(signal.T, orig_sr=SAMPLE_RATE, target_sr=sample_rate).T
        if sample_rate != SAMPLE_RATE
        else signal
    )
    # A last block of 3 samples; at 48 and 8 kHz, the resampler then gives one sample fewer than librosa's length
    # (rounded up), and the end is padded as librosa pads it.
    signal = np.ascontiguousarray(signal[: (len(signal) // 1000 - 1) * 1000 + 3])
    path = tmp_path / "song.wav"
    soundfile.write(path, signal, sample_rate, subtype="FLOAT")
    whole = features.waveform_features(signal.astype(np.float32), sample_rate, "song.wav", settings, resample=True)
    streamed = _streamed(path, settings, resample=True, **options)
    assert streamed.shape == whole.shape and streamed.dtype == np.float32
    np.testing.assert_array_equal(streamed, whole)


def test_an_mp3_decoded_twice_gives_its_features_and_its_decoder_messages_once(tmp_path, capfd):
    """A real MP3 cut in half (libmpg123 warns about it, and it decodes short of its header): decoded twice in
    blocks (libsndfile reopened on the file), the features equal the whole decode's, and the decoder's messages
    and the short-decode warning are printed once, naming the file. Its quiet first half second followed by sound
    is where a block read that seeks after itself (`SoundFile.read`) decodes a frame as zeros."""
    path = tmp_path / "cut.mp3"
    data = _encoded(_stereo_signal(3.0), SAMPLE_RATE, "MP3")
    path.write_bytes(data[: len(data) // 2])
    whole = features.audio_features(path.read_bytes(), str(path), features.FeatureSettings())
    capfd.readouterr()
    streamed = _streamed(path, features.FeatureSettings(), **SMALL_BLOCKS)
    np.testing.assert_array_equal(streamed, whole)
    lines = capfd.readouterr().err.splitlines()
    assert sum("Xing stream size off" in line for line in lines) == 1, lines
    assert sum(line.startswith(f"warning: {path}: decoded") for line in lines) == 1, lines
    assert all(str(path) in line for line in lines), lines


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"", features.AudioError, "empty file: NAME"),
        (b"ID3\x03\x00garbage" * 100, features.AudioError, "cannot decode NAME"),
        (_encoded(_stereo_signal(1.0), 48000, "WAV"), features.AudioError, "sample rate 48000 Hz in NAME"),
        (_encoded(np.zeros((SAMPLE_RATE, 3), np.float32), SAMPLE_RATE, "WAV"), features.AudioError, "channel count 3"),
        (
            _encoded(np.full((5000, 1), np.nan, np.float32), SAMPLE_RATE, "WAV", "FLOAT"),
            features.AudioError,
            "non-finite",
        ),
        (_encoded(np.zeros((1, 1), np.float32), SAMPLE_RATE, "WAV"), ValueError, "1 samples: need more than"),
    ],
)
def test_a_bad_file_read_in_blocks_fails_before_any_features_with_the_whole_decode_s_error(
    tmp_path, without_ffmpeg, data, error, message
):
    path = tmp_path / "48" / "948.mp3"
    path.parent.mkdir()
    path.write_bytes(data)
    blocks = features.file_feature_blocks(path, "48/948.mp3", features.FeatureSettings())
    with pytest.raises(error, match=message.replace("NAME", "48/948.mp3")):
        next(blocks)


def test_ffmpeg_decodes_in_blocks_what_libsndfile_cannot_read(ffmpeg, tmp_path):
    source = _stereo_signal(2.0)
    soundfile.write(tmp_path / "source.flac", source, SAMPLE_RATE, subtype="PCM_16")
    encoded = tmp_path / "song.mka"  # Matroska FLAC: lossless, and not libsndfile's
    subprocess.run([ffmpeg, "-v", "error", "-i", tmp_path / "source.flac", "-c:a", "flac", encoded], check=True)
    decoded, sample_rate = features.decode_audio(encoded.read_bytes(), "song.mka")
    whole = features.waveform_features(decoded, sample_rate, "song.mka", features.FeatureSettings())
    streamed = _streamed(encoded, features.FeatureSettings(), **SMALL_BLOCKS)
    np.testing.assert_array_equal(streamed, whole)
