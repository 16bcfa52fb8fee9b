"""Spectrogram features of the recipe (docs/fidelity.md, "Features"), computed fast in float32.

The faithful default follows the authors' order: A-weighted dB of the STFT power spectrogram, then a
256-band Slaney mel filterbank applied to those dB values. The common log-mel order (mel power, then dB)
is offered as ``order="mel_then_db"``. Results match librosa's reference pipeline to float32 rounding,
at several times its speed: the filterbank and weights are computed once per setting, frames are strided
views, and the mel projection of the (constant per bin) A-weighting is folded into one vector. Features are of the
mean of the channels, or with ``mono=False`` (``hop512_stereo``) of each of two channels, stacked first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.fft
import soundfile

ORDERS: tuple[str, ...] = ("weighted_db_then_mel", "mel_then_db")
SOURCES: tuple[str, ...] = ("audio", "npy")

# The channels of a stereo setting: the authors' DCASE `d18_stereo` input (docs/fidelity.md, "Features").
STEREO_CHANNELS = 2
AMIN = 1e-10
TOP_DB = 80.0
# Frames per FFT block: keeps the temporary frame matrix small (about 8 MiB) whatever the track length.
_BLOCK_FRAMES = 1024


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """One feature setting: what a builder config stores and what checkpoints record."""

    source: str = "audio"  # "audio" (decode and compute) or "npy" (the organisers' precomputed mels)
    sample_rate: int = 44100
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 256
    order: str = "weighted_db_then_mel"
    mono: bool = True  # False: each of two channels' features, as the authors' DCASE `d18_stereo` (STEREO_CHANNELS)
    chunk_frames: int = 1722  # 20 s at 86.13 frames/s; a training crop is at most half of it
    min_frames: int = 87  # about 1 s; shorter tracks go to the failures report

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"FeatureSettings.source={self.source!r}: expected one of {SOURCES}")
        if self.order not in ORDERS:
            raise ValueError(f"FeatureSettings.order={self.order!r}: expected one of {ORDERS}")
        if not self.mono and self.source != "audio":
            raise ValueError(f"FeatureSettings.mono=False: {self.source!r} input has one channel, only audio has two")
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "chunk_frames", "min_frames"):
            if getattr(self, name) <= 0:
                raise ValueError(f"FeatureSettings.{name}={getattr(self, name)} must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def channels(self) -> int:
        return 1 if self.mono else STEREO_CHANNELS

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """The shape of one stored frame: (n_mels,) mono, (STEREO_CHANNELS, n_mels) stereo."""
        return (self.n_mels,) if self.mono else (self.channels, self.n_mels)


# One builder config per setting; chunk_frames is 20 s everywhere.
CONFIGS: dict[str, FeatureSettings] = {
    "hop512": FeatureSettings(),
    "hop1536": FeatureSettings(hop_length=1536, chunk_frames=574, min_frames=29),
    "hop512_logmel": FeatureSettings(order="mel_then_db"),
    "hop512_stereo": FeatureSettings(mono=False),
    "essentia96": FeatureSettings(
        source="npy", sample_rate=12000, n_fft=512, hop_length=256, n_mels=96, chunk_frames=938, min_frames=47
    ),
}
CONFIG_DESCRIPTIONS = {
    "hop512": "faithful default: 44.1 kHz mono, STFT 2048 / hop 512, A-weighted dB power, then 256 Slaney mels",
    "hop1536": "as hop512 with hop 1536 (25 % overlap), the CRNN and ResNet-34 input",
    "hop512_logmel": "as hop512 in the common order: 256 Slaney mels of the power, then dB (no A-weighting)",
    "hop512_stereo": "as hop512 for each of the two channels (a mono file's twice), the authors' DCASE d18_stereo",
    "essentia96": "the organisers' precomputed Essentia mel-spectrograms: 12 kHz, hop 256, 96 bands, dB",
}


def settings_for(config_name: str) -> FeatureSettings:
    """The feature setting of a builder config, with an error that lists the valid names."""
    if config_name not in CONFIGS:
        raise ValueError(f"unknown config {config_name!r}; expected one of {tuple(CONFIGS)}")
    return CONFIGS[config_name]


@functools.lru_cache(maxsize=8)
def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney mel matrix (n_mels, 1 + n_fft // 2), librosa's defaults with fmax = sr / 2."""
    import librosa  # imported here: only needed once per setting, and slow to import

    matrix = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, dtype=np.float32)
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=8)
def _a_weighting_db(sample_rate: int, n_fft: int) -> np.ndarray:
    """A-weighting in dB per FFT bin, clipped at -80 dB as librosa's ``A_weighting`` does."""
    freqs_sq = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate).astype(np.float64) ** 2
    consts = np.array([12194.217, 20.598997, 107.65265, 737.86223]) ** 2
    with np.errstate(divide="ignore"):
        weights = 2.0 + 20.0 * (
            np.log10(consts[0])
            + 2 * np.log10(freqs_sq)
            - np.log10(freqs_sq + consts[0])
            - np.log10(freqs_sq + consts[1])
            - 0.5 * np.log10(freqs_sq + consts[2])
            - 0.5 * np.log10(freqs_sq + consts[3])
        )
    weights = np.maximum(-80.0, weights)
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=8)
def _mel_of_weighting(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """mel @ A-weighting: the constant per-bin offset, projected once instead of added per frame."""
    mel = _mel_filterbank(sample_rate, n_fft, n_mels).astype(np.float64)
    offset = (mel @ _a_weighting_db(sample_rate, n_fft)).astype(np.float32)
    offset.setflags(write=False)
    return offset


@functools.lru_cache(maxsize=8)
def _hann_window(n_fft: int) -> np.ndarray:
    """Periodic Hann window, as librosa's ``get_window("hann", n_fft, fftbins=True)``."""
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    window.setflags(write=False)
    return window


def to_mono(waveform: np.ndarray) -> np.ndarray:
    """float32 (samples,) from (samples,) or (samples, channels), averaging the channels."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim == 1:
        return np.ascontiguousarray(waveform)
    if waveform.ndim != 2 or waveform.shape[1] == 0:
        raise ValueError(f"waveform has shape {waveform.shape}: expected (samples,) or (samples, channels)")
    # Column sums: several times faster than mean(axis=1) over a short last axis, and equal to it.
    mono = waveform[:, 0].copy()
    for channel in range(1, waveform.shape[1]):
        mono += waveform[:, channel]
    mono /= np.float32(waveform.shape[1])
    return mono


def power_spectrogram(mono: np.ndarray, n_fft: int, hop_length: int) -> np.ndarray:
    """|STFT|^2, float32 (frames, 1 + n_fft // 2): centred frames, reflect padding, periodic Hann."""
    padded = np.pad(mono, n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]
    window = _hann_window(n_fft)
    power = np.empty((frames.shape[0], n_fft // 2 + 1), dtype=np.float32)
    for start in range(0, frames.shape[0], _BLOCK_FRAMES):
        block = frames[start : start + _BLOCK_FRAMES] * window
        spectrum = scipy.fft.rfft(block, axis=-1, workers=1)
        np.square(spectrum.real, out=power[start : start + len(block)])
        power[start : start + len(block)] += np.square(spectrum.imag)
    return power


def _db_in_place(power: np.ndarray, top_db: float) -> np.ndarray:
    """10 log10(max(power, amin)), floored at (peak - top_db): librosa's ``power_to_db(ref=1.0)``."""
    floor = max(AMIN, float(power.max()) * 10.0 ** (-top_db / 10.0))
    np.maximum(power, floor, out=power)
    np.log10(power, out=power)
    power *= 10.0
    return power


def spectrogram(
    waveform: np.ndarray,
    sample_rate: int,
    *,
    n_fft: int = 2048,
    hop_length: int = 512,
    n_mels: int = 256,
    order: str = "weighted_db_then_mel",
    top_db: float = TOP_DB,
) -> np.ndarray:
    """Mel spectrogram float32 (n_mels, frames) of one track, frames = 1 + samples // hop_length.

    ``waveform`` is float (samples,) or (samples, channels); channels are averaged to mono.
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: expected one of {ORDERS}")
    mono = to_mono(waveform)
    if mono.size == 0:
        raise ValueError("waveform is empty: no samples to compute a spectrogram from")
    if not np.isfinite(mono).all():
        raise ValueError("waveform contains NaN or infinite samples")
    if mono.size <= n_fft // 2:
        raise ValueError(f"waveform has {mono.size} samples: need more than n_fft // 2 = {n_fft // 2}")
    power = power_spectrogram(mono, n_fft, hop_length)
    mel = _mel_filterbank(sample_rate, n_fft, n_mels)
    if order == "weighted_db_then_mel":
        mels = _db_in_place(power, top_db) @ mel.T
        mels += _mel_of_weighting(sample_rate, n_fft, n_mels)
    else:
        mels = _db_in_place(power @ mel.T, top_db)
    return np.ascontiguousarray(mels.T)


class AudioError(ValueError):
    """A track's audio cannot give features; the message is the reason in the failures report."""


# What libsndfile reads, said in the error for a file that it cannot read when no ffmpeg is there to try.
LIBSNDFILE_FORMATS = "MP3, WAV, FLAC, OGG (Vorbis, Opus), AIFF"
LIBSNDFILE_SUFFIXES = (".mp3", ".wav", ".flac", ".ogg", ".oga", ".opus", ".aiff", ".aif")


# A file that decodes to less than this share of the samples its header announces is named on standard error with both
# durations (a truncated or damaged file): an MP3's header count may be estimated from its bit rate, so a few per cent
# are tolerated.
SHORT_DECODE_FRACTION = 0.9
# The decoder's messages about one file printed at most (a damaged MP3 can give one per frame), then their count.
DECODER_MESSAGES_SHOWN = 10


def decode_audio(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """float32 (samples, channels) and the sample rate of an encoded file, at its own rate and channel count.

    libsndfile decodes what it reads (`LIBSNDFILE_FORMATS` and a few more); any other file (M4A/AAC, WMA, ...) goes
    through `ffmpeg` when it is on the PATH. AudioError, naming the file, when neither can decode it; without ffmpeg
    the error says to install it. What the decoder prints (libmpg123's warnings) and a decode much shorter than
    the header announces (`short_decode_warning`) are lines on standard error that name the file.
    """
    if not data:
        raise AudioError(f"empty file: {name}")
    try:
        with _decoder_messages_named(name), soundfile.SoundFile(io.BytesIO(data)) as audio:
            header_frames = audio.frames
            waveform = audio.read(dtype="float32", always_2d=True)
            sample_rate = audio.samplerate
        warning = short_decode_warning(name, waveform.shape[0], header_frames, sample_rate)
        if warning:
            print(warning, file=sys.stderr, flush=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        reason = getattr(error, "error_string", None) or error  # libsndfile's own words, without the stream's repr
        waveform, sample_rate = _ffmpeg_decode(data, name, str(reason))
    if waveform.shape[0] == 0:
        raise AudioError(f"no audio samples decoded from {name}")
    return waveform, int(sample_rate)


def short_decode_warning(name: str, decoded_frames: int, header_frames: int, sample_rate: int) -> str | None:
    """The warning for a file that decoded to much less audio than its header says (a truncated download or copy),
    or None: its features would describe only the start of the track."""
    if header_frames <= 0 or decoded_frames >= SHORT_DECODE_FRACTION * header_frames:
        return None
    decoded, announced = decoded_frames / sample_rate, header_frames / sample_rate
    return (
        f"warning: {name}: decoded {decoded:.1f} s of audio, its header says {announced:.1f} s (a truncated or "
        f"damaged file?); using the {decoded:.1f} s decoded"
    )


@contextlib.contextmanager
def _decoder_messages_named(name: str) -> Iterator[None]:
    """libsndfile's MP3 decoder (libmpg123) prints its warnings ("Xing stream size off ...") on the process's
    standard error without naming the file: they are caught at the file descriptor, in a temporary file (a pipe
    could fill and block the decoder), and printed again after the decode, each line prefixed with the file's name.
    Without a standard error to redirect (or a temporary file to catch it in), the decode runs as it is."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(os.close, saved)
        try:
            caught = cleanup.enter_context(tempfile.TemporaryFile())
        except OSError:
            yield
            return
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            caught.seek(0)
            lines = [line.strip() for line in caught.read().decode("utf-8", errors="replace").splitlines()]
            lines = [line for line in lines if line]
            for line in lines[:DECODER_MESSAGES_SHOWN]:
                print(f"{name}: {line}", file=sys.stderr, flush=True)
            if len(lines) > DECODER_MESSAGES_SHOWN:
                print(f"{name}: ({len(lines) - DECODER_MESSAGES_SHOWN} more decoder messages)", file=sys.stderr)


def _ffmpeg_decode(data: bytes, name: str, libsndfile_reason: str) -> tuple[np.ndarray, int]:
    """A file libsndfile refused, decoded by ffmpeg to float32 WAV at the first audio stream's rate and channels.

    Both sides are temporary files, not pipes: an MP4/M4A whose index follows its audio needs a seekable input, and a
    seekable WAV output gets a header that states its length (RF64 past 4 GiB).
    """
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None and Path(name).suffix.lower() in LIBSNDFILE_SUFFIXES:
        raise AudioError(
            f"cannot decode {name}: {libsndfile_reason}; the file is damaged, or not the {Path(name).suffix} audio "
            "its name says: replace it (with ffmpeg on the PATH, it would be tried too)"
        )
    if ffmpeg is None:
        raise AudioError(
            f"cannot decode {name}: {libsndfile_reason}; libsndfile reads {LIBSNDFILE_FORMATS}: for other formats "
            "(M4A/AAC, WMA, ...) install ffmpeg and put it on the PATH"
        )
    with tempfile.TemporaryDirectory(prefix="emorf_decode_") as directory:
        encoded, decoded = Path(directory) / f"input{Path(name).suffix}", Path(directory) / "decoded.wav"
        encoded.write_bytes(data)
        command = [ffmpeg, "-nostdin", "-v", "error", "-i", str(encoded), "-map", "0:a:0", "-c:a", "pcm_f32le"]
        result = subprocess.run([*command, "-rf64", "auto", str(decoded)], capture_output=True, text=True)
        if result.returncode != 0 or not decoded.is_file():
            reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            reason = reason.replace(str(encoded), name)  # ffmpeg names its input: the temporary copy
            raise AudioError(f"cannot decode {name}: libsndfile: {libsndfile_reason}; ffmpeg: {reason}")
        waveform, sample_rate = soundfile.read(decoded, dtype="float32", always_2d=True)
    return waveform, int(sample_rate)


def waveform_features(
    waveform: np.ndarray, sample_rate: int, name: str, settings: FeatureSettings, *, resample: bool = False
) -> np.ndarray:
    """Features float32 of a decoded waveform (samples, channels), checked against ``settings``: (n_mels, frames) of
    the mean of the channels, or for a stereo setting (STEREO_CHANNELS, n_mels, frames), each channel's features as
    the mono path computes them from that channel alone (a mono file's one channel twice).

    With ``resample``, any sample rate is resampled to the setting's (per signal, after a mono setting's mix-down,
    with soxr's high-quality filter, librosa's default) and a mono setting mixes down any channel count; without it
    they are errors naming the file. More than two channels are always an error for a stereo setting: no two-channel
    mix-down is defined (the authors' `d18_stereo` keeps every channel, which their two-channel model refuses).
    """
    channels = waveform.shape[1]
    if sample_rate != settings.sample_rate and not resample:
        raise AudioError(f"unexpected sample rate {sample_rate} Hz in {name} (expected {settings.sample_rate})")
    if channels not in (1, STEREO_CHANNELS) and (not resample or not settings.mono):
        raise AudioError(f"unexpected channel count {channels} in {name} (expected 1 or {STEREO_CHANNELS})")
    if not np.isfinite(waveform).all():
        raise AudioError(f"non-finite samples decoded from {name}")
    signals = [to_mono(waveform)] if settings.mono else [waveform[:, channel] for channel in range(channels)]
    if sample_rate != settings.sample_rate:
        import librosa  # imported here: slow to import, and only needed for other rates

        signals = [librosa.resample(signal, orig_sr=sample_rate, target_sr=settings.sample_rate) for signal in signals]
    mels = [
        spectrogram(
            signal,
            settings.sample_rate,
            n_fft=settings.n_fft,
            hop_length=settings.hop_length,
            n_mels=settings.n_mels,
            order=settings.order,
        )
        for signal in signals
    ]
    if settings.mono:
        return mels[0]
    return np.stack(mels if channels == STEREO_CHANNELS else mels * STEREO_CHANNELS)


def audio_features(data: bytes, name: str, settings: FeatureSettings, *, resample: bool = False) -> np.ndarray:
    """Features float32 of one encoded audio file, shaped as ``waveform_features`` says."""
    waveform, sample_rate = decode_audio(data, name)
    return waveform_features(waveform, sample_rate, name, settings, resample=resample)


def npy_features(data: bytes, name: str, settings: FeatureSettings) -> np.ndarray:
    """The organisers' precomputed mel-spectrogram (n_mels, frames) from a ``.npy`` file's bytes."""
    if not data:
        raise AudioError(f"empty file: {name}")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise AudioError(f"cannot read {name} as .npy: {error}") from error
    if array.ndim != 2 or array.shape[0] != settings.n_mels:
        raise AudioError(f"{name} has shape {array.shape}: expected ({settings.n_mels}, frames)")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise AudioError(f"{name} holds {array.dtype} values that are not all finite floats")
    return np.ascontiguousarray(array, dtype=np.float32)


def source_path(audio_path: str, settings: FeatureSettings) -> str:
    """Relative path of a track's input: the TSV's MP3 path, or the ``.npy`` beside its stem."""
    return str(Path(audio_path).with_suffix(".npy")) if settings.source == "npy" else audio_path


def track_features(data: bytes, name: str, settings: FeatureSettings, *, resample: bool = False) -> np.ndarray:
    """Features of one track's input file, by the setting's source (`resample`: see `waveform_features`)."""
    if settings.source == "npy":
        return npy_features(data, name, settings)
    return audio_features(data, name, settings, resample=resample)
