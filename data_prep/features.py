"""Spectrogram features of the recipe (docs/fidelity.md, "Features"), computed fast in float32.

The faithful default follows the authors' order: A-weighted dB of the STFT power spectrogram, then a
256-band Slaney mel filterbank applied to those dB values. The common log-mel order (mel power, then dB)
is offered as ``order="mel_then_db"``. Results match librosa's reference pipeline to float32 rounding,
at several times its speed: the filterbank and weights are computed once per setting, frames are strided
views windowed and transformed a cache-sized batch at a time, the dB are natural logarithms (several times
cheaper than log10) whose factor 10 / ln 10 is folded into the filterbank, the filterbank is a sparse matrix
(each Slaney filter spans a few FFT bins), and the mel projection of the (constant per bin) A-weighting is
folded into one vector. Features are of the mean of the channels, or with ``mono=False`` (``hop512_stereo``)
of each of two channels, stacked first. A file's features are computed in blocks (`FileFeatures`: decoded,
resampled, framed and projected a block at a time), the same as the whole decode's, in memory that does not grow
with the track's length (docs/faults.md, "Memory of a long file").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import scipy.fft
import scipy.sparse
import soundfile
import soxr

ORDERS: tuple[str, ...] = ("weighted_db_then_mel", "mel_then_db")
SOURCES: tuple[str, ...] = ("audio", "npy")

# The channels of a stereo setting: the authors' DCASE `d18_stereo` input (docs/fidelity.md, "Features").
STEREO_CHANNELS = 2
AMIN = 1e-10
TOP_DB = 80.0
# Frames per block of the mel projection (`_project`), counted from a track's first frame.
_BLOCK_FRAMES = 1024
# Frames windowed and transformed at a time: their windowed samples and spectra (2 MiB at n_fft 2048) stay in cache.
_FFT_FRAMES = 256
# dB per neper of power: 10 log10(x) = DB_PER_NEPER * ln(x).
DB_PER_NEPER = 10.0 / np.log(10.0)
# Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above.
_SLANEY_HZ_PER_MEL = 200.0 / 3
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_START_MEL = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = np.log(6.4) / 27.0


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


def _hz_to_slaney_mel(hz: float) -> float:
    """A frequency on Slaney's mel scale, as ``librosa.hz_to_mel`` computes it."""
    if hz < _SLANEY_LOG_START_HZ:
        return hz / _SLANEY_HZ_PER_MEL
    return _SLANEY_LOG_START_MEL + float(np.log(hz / _SLANEY_LOG_START_HZ)) / _SLANEY_LOG_STEP


def _slaney_mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """The frequencies of points on Slaney's mel scale, as ``librosa.mel_to_hz`` computes them."""
    hz = _SLANEY_HZ_PER_MEL * mels
    logarithmic = mels >= _SLANEY_LOG_START_MEL
    hz[logarithmic] = _SLANEY_LOG_START_HZ * np.exp(_SLANEY_LOG_STEP * (mels[logarithmic] - _SLANEY_LOG_START_MEL))
    return hz


@functools.lru_cache(maxsize=8)
def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney mel matrix float32 (n_mels, 1 + n_fft // 2): triangles between mel-spaced edges from 0 Hz to sr / 2,
    each scaled to unit area (Slaney's norm), computed as ``librosa.filters.mel`` computes it with its defaults, to
    the bit (a test checks it). Computed here, not by librosa, because importing ``librosa.filters`` (scipy.signal,
    numba) costs each data-preparation worker about 0.9 s of CPU."""
    fft_hz = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    mel_edges = np.linspace(_hz_to_slaney_mel(0.0), _hz_to_slaney_mel(float(sample_rate) / 2), n_mels + 2)
    edges = _slaney_mel_to_hz(mel_edges)
    widths = np.diff(edges)
    ramps = np.subtract.outer(edges, fft_hz)
    matrix = np.zeros((n_mels, len(fft_hz)), dtype=np.float32)
    for band in range(n_mels):
        rising, falling = -ramps[band] / widths[band], ramps[band + 2] / widths[band + 1]
        matrix[band] = np.maximum(0, np.minimum(rising, falling))
    matrix *= (2.0 / (edges[2 : n_mels + 2] - edges[:n_mels]))[:, np.newaxis]
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=8)
def _mel_projection(sample_rate: int, n_fft: int, n_mels: int, scale: float) -> scipy.sparse.csr_array:
    """`scale` times the mel matrix as a sparse float32 (n_mels, 1 + n_fft // 2) matrix: a Slaney filter spans a
    few FFT bins (under 1 % of the dense matrix at 2048 / 256), so the product with the spectra costs a few multiply-
    adds per bin instead of one per mel band. Each mel value is summed over its filter's bins in bin order, whatever
    the number of frames in the product."""
    matrix = (_mel_filterbank(sample_rate, n_fft, n_mels).astype(np.float64) * scale).astype(np.float32)
    return scipy.sparse.csr_array(matrix)


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
    mono = waveform[:, 0] + waveform[:, 1] if waveform.shape[1] > 1 else waveform[:, 0].copy()
    for channel in range(2, waveform.shape[1]):
        mono += waveform[:, channel]
    mono /= np.float32(waveform.shape[1])
    return mono


def power_spectrogram(mono: np.ndarray, n_fft: int, hop_length: int) -> np.ndarray:
    """|STFT|^2, float32 (frames, 1 + n_fft // 2): centred frames, reflect padding, periodic Hann."""
    return power_spectrogram_of_frames(np.pad(mono, n_fft // 2, mode="reflect"), n_fft, hop_length)


def power_spectrogram_of_frames(
    padded: np.ndarray, n_fft: int, hop_length: int, out: np.ndarray | None = None
) -> np.ndarray:
    """|FFT|^2 float32 (frames, 1 + n_fft // 2) of the periodic-Hann-windowed frames of an already padded signal,
    every `hop_length` samples from its start (`power_spectrogram` of a padded track, or of a block of it), in `out`
    when given. Each frame's spectrum is the same however many frames are transformed with it."""
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]
    window = _hann_window(n_fft)
    power = np.empty((frames.shape[0], n_fft // 2 + 1), dtype=np.float32) if out is None else out
    windowed = np.empty((min(_FFT_FRAMES, frames.shape[0]), n_fft), dtype=np.float32)
    for start in range(0, frames.shape[0], _FFT_FRAMES):
        batch = frames[start : start + _FFT_FRAMES]
        np.multiply(batch, window, out=windowed[: len(batch)])
        spectrum = scipy.fft.rfft(windowed[: len(batch)], axis=-1, workers=1)
        np.square(spectrum.real, out=power[start : start + len(batch)])
        power[start : start + len(batch)] += np.square(spectrum.imag)
    return power


def _floor(power: np.ndarray, top_db: float, peak: float | None) -> float:
    """librosa's ``power_to_db`` floor: `top_db` below the peak power (by default `power`'s own), at least AMIN."""
    peak = float(power.max()) if peak is None else peak
    return max(AMIN, peak * 10.0 ** (-top_db / 10.0))


def _log_in_place(power: np.ndarray, top_db: float, peak: float | None = None) -> np.ndarray:
    """ln(max(power, floor)) (`_floor`): the dB of ``power_to_db(ref=1.0)`` over DB_PER_NEPER. `peak` is the whole
    track's largest value when `power` is only a block of it."""
    np.maximum(power, _floor(power, top_db, peak), out=power)
    return np.log(power, out=power)


def _db_in_place(power: np.ndarray, top_db: float, peak: float | None = None) -> np.ndarray:
    """10 log10(max(power, floor)): librosa's ``power_to_db(ref=1.0)`` (see `_log_in_place`)."""
    power = _log_in_place(power, top_db, peak)
    power *= np.float32(DB_PER_NEPER)
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
    if order == "weighted_db_then_mel":
        mels = _project(_log_in_place(power, top_db), _mel_projection(sample_rate, n_fft, n_mels, DB_PER_NEPER))
        mels += _mel_of_weighting(sample_rate, n_fft, n_mels)[:, np.newaxis]
        return mels
    return _db_in_place(_project(power, _mel_projection(sample_rate, n_fft, n_mels, 1.0)), top_db)


def _project(values: np.ndarray, projection: scipy.sparse.csr_array) -> np.ndarray:
    """`projection @ values.T` float32 (n_mels, frames) of `values` (frames, bins), in blocks of `_BLOCK_FRAMES`
    frames from the first: a track's features come out the same, to the bit, whether it is computed whole or in
    blocks of frames that start at multiples of `_BLOCK_FRAMES` (`_SignalFeatures`), however the product is
    vectorised, and the transposed copy of the values that the product makes stays small."""
    projected = np.empty((projection.shape[0], len(values)), np.float32)
    for start in range(0, len(values), _BLOCK_FRAMES):
        projected[:, start : start + _BLOCK_FRAMES] = projection @ values[start : start + _BLOCK_FRAMES].T
    return projected


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
    """The decoder's messages during the block, printed after it, each naming the file (`_DecoderMessages`)."""
    messages = _DecoderMessages(name)
    try:
        with messages.caught():
            yield
    finally:
        messages.report()
        messages.close()


class _DecoderMessages:
    """libsndfile's MP3 decoder (libmpg123) prints its warnings ("Xing stream size off ...") on the process's
    standard error without naming the file: they are caught at the file descriptor while the decoder runs
    (`caught`, around each read only, so that nothing else the process prints is taken), in a temporary file (a pipe
    could fill and block the decoder), and printed by `report`, each line prefixed with the file's name. Without a
    standard error to redirect (or a temporary file to catch it in), the decoder prints as it would."""

    def __init__(self, name: str):
        self.name, self.lines = name, []
        try:
            self._file: IO[bytes] | None = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        except OSError:
            self._file = None

    @contextlib.contextmanager
    def caught(self) -> Iterator[None]:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved is None or self._file is None:
            yield
            return
        os.dup2(self._file.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            self._file.seek(0)
            text = self._file.read().decode("utf-8", errors="replace")
            self._file.seek(0)
            self._file.truncate()
            self.lines += [line.strip() for line in text.splitlines() if line.strip()]

    def report(self) -> None:
        """Prints the messages caught so far (at most DECODER_MESSAGES_SHOWN, then their count) and forgets them."""
        for line in self.lines[:DECODER_MESSAGES_SHOWN]:
            print(f"{self.name}: {line}", file=sys.stderr, flush=True)
        if len(self.lines) > DECODER_MESSAGES_SHOWN:
            print(f"{self.name}: ({len(self.lines) - DECODER_MESSAGES_SHOWN} more decoder messages)", file=sys.stderr)
        self.lines = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _ffmpeg_decode(data: bytes, name: str, libsndfile_reason: str) -> tuple[np.ndarray, int]:
    """A file libsndfile refused, decoded by ffmpeg to float32 WAV at the first audio stream's rate and channels.

    Both sides are temporary files, not pipes: an MP4/M4A whose index follows its audio needs a seekable input, and a
    seekable WAV output gets a header that states its length (RF64 past 4 GiB).
    """
    ffmpeg = _ffmpeg_or_error(name, libsndfile_reason)
    with tempfile.TemporaryDirectory(prefix="emorf_decode_") as directory:
        encoded, decoded = Path(directory) / f"input{Path(name).suffix}", Path(directory) / "decoded.wav"
        encoded.write_bytes(data)
        _ffmpeg_to_wav(ffmpeg, encoded, decoded, name, libsndfile_reason)
        waveform, sample_rate = soundfile.read(decoded, dtype="float32", always_2d=True)
    return waveform, int(sample_rate)


def _ffmpeg_or_error(name: str, libsndfile_reason: str) -> str:
    """The ffmpeg on the PATH, or the AudioError of a file libsndfile refused that says what to do."""
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
    return ffmpeg


def _ffmpeg_to_wav(ffmpeg: str, encoded: Path, decoded: Path, name: str, libsndfile_reason: str) -> None:
    """Decodes `encoded` (the file called `name`) into the float32 WAV `decoded`; AudioError naming it if it fails."""
    command = [ffmpeg, "-nostdin", "-v", "error", "-i", str(encoded), "-map", "0:a:0", "-c:a", "pcm_f32le"]
    result = subprocess.run([*command, "-rf64", "auto", str(decoded)], capture_output=True, text=True)
    if result.returncode != 0 or not decoded.is_file():
        reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        reason = reason.replace(str(encoded), name)  # ffmpeg names its input by the path it was given
        raise AudioError(f"cannot decode {name}: libsndfile: {libsndfile_reason}; ffmpeg: {reason}")


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


# Samples per channel decoded at a time when a file is read in blocks: 6 s at 44.1 kHz, 2 MiB of float32 stereo.
DECODE_BLOCK_FRAMES = 2**18
# A track's spectrogram values before the dB floor (the power spectra, or their mels for "mel_then_db"), kept from the
# decode to the features up to this many bytes: the floor is the whole track's peak minus TOP_DB, so no frame's
# features are known before the last frame is decoded. A track whose values fit (hop512: about 12 minutes, stereo
# half that) is decoded once; a longer one is decoded a second time once its peak is known. Either way the memory
# does not grow with the track's length.
PEAK_BUFFER_BYTES = 256 * 2**20


class _Undecodable(Exception):
    """libsndfile failed while reading a file it had opened; the message is its reason."""


class AudioFile:
    """An audio file decoded in blocks (`blocks`), from its start as often as asked, without holding it whole: by
    libsndfile, or for what libsndfile cannot open by `ffmpeg` on the PATH into a temporary float32 WAV file (decoded
    once). The file is opened by Python first, so that a missing or locked file raises its OSError, and a read that
    never returns (a named pipe, a hung network mount) blocks here, where a caller's deadline can stop it.

    The decoder's messages of the first complete decode are printed after it, naming the file, with the short-decode
    warning (`short_decode_warning`); those of later decodes are the same and are dropped.
    """

    def __init__(self, path: str | Path, name: str):
        self.name = name
        self._cleanup = contextlib.ExitStack()
        self._messages = _DecoderMessages(name)
        self._cleanup.callback(self._messages.close)
        self._decodes = 0
        try:
            self._input = self._cleanup.enter_context(open(path, "rb"))  # noqa: SIM115 - closed by close()
            status = os.fstat(self._input.fileno())
            if stat.S_ISREG(status.st_mode) and status.st_size == 0:
                raise AudioError(f"empty file: {name}")
            self._wav: Path | None = None
            try:
                self._file = self._open()
            except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
                self.decode_with_ffmpeg(_libsndfile_reason(error))
        except BaseException:
            self.close()
            raise

    def _open(self) -> soundfile.SoundFile:
        """A fresh decoder at the start of the file (the original or ffmpeg's WAV)."""
        if self._wav is not None:
            return soundfile.SoundFile(self._wav)
        self._input.seek(0)
        with self._messages.caught():
            return soundfile.SoundFile(self._input.fileno(), closefd=False)

    def decode_with_ffmpeg(self, libsndfile_reason: str) -> None:
        """From now on, decode the file with ffmpeg (a file libsndfile refused); AudioError naming it when ffmpeg is
        missing or fails too, or when this is ffmpeg's decode already."""
        if self._wav is not None:
            raise AudioError(f"cannot decode {self.name}: {libsndfile_reason}")
        ffmpeg = _ffmpeg_or_error(self.name, libsndfile_reason)
        directory = Path(self._cleanup.enter_context(tempfile.TemporaryDirectory(prefix="emorf_decode_")))
        _ffmpeg_to_wav(ffmpeg, Path(self._input.name), directory / "decoded.wav", self.name, libsndfile_reason)
        self._wav = directory / "decoded.wav"
        self._messages.lines = []
        self._file = self._open()

    @property
    def sample_rate(self) -> int:
        return int(self._file.samplerate)

    @property
    def channels(self) -> int:
        return int(self._file.channels)

    @property
    def header_frames(self) -> int:
        """Samples per channel that the file's header announces (an MP3's may be an estimate)."""
        return int(self._file.frames)

    @property
    def duration(self) -> float | None:
        """Seconds of audio that the header announces; None where it does not say (libsndfile's largest count)."""
        return self.header_frames / self.sample_rate if 0 < self.header_frames < 2**62 else None

    def blocks(self, block_frames: int = DECODE_BLOCK_FRAMES) -> Iterator[np.ndarray]:
        """float32 (samples, channels) blocks of the whole file from its start. _Undecodable when libsndfile fails
        part way."""
        if self._decodes:
            self._file.close()
            self._file = self._open()
        decoded = 0
        while True:
            with self._messages.caught():
                try:
                    block = _read_on(self._file, block_frames)
                except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
                    raise _Undecodable(_libsndfile_reason(error)) from error
            if not len(block):
                break
            decoded += len(block)
            yield block
        self._decodes += 1
        if self._decodes == 1:
            self._messages.report()
            warning = short_decode_warning(self.name, decoded, self.header_frames, self.sample_rate)
            if warning:
                print(warning, file=sys.stderr, flush=True)
        self._messages.lines = []

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
        self._cleanup.close()

    def __enter__(self) -> AudioFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _read_on(file: soundfile.SoundFile, frames: int) -> np.ndarray:
    """Up to `frames` float32 (frames, channels) samples from where the decoder is, by libsndfile's `sf_readf_float`
    itself (soundfile's C binding): `SoundFile.read` seeks to the position it has just read to after every read,
    and for an MP3 that is a seek of libmpg123's, which decodes the frames after it without the bit reservoir of
    those before: where a read ends in a quiet passage followed by sound, a frame comes out as zeros. Read on
    without seeking, the blocks are sample for sample the whole file's decode."""
    out = np.empty((frames, file.channels), np.float32)
    count = soundfile._snd.sf_readf_float(file._file, soundfile._ffi.cast("float *", out.ctypes.data), frames)
    soundfile._error_check(soundfile._snd.sf_error(file._file))
    return out[:count]


def _libsndfile_reason(error: BaseException) -> str:
    """libsndfile's own words for a failure, without the stream's repr."""
    return str(getattr(error, "error_string", None) or error)


class _SignalFeatures:
    """One signal's way from decoded samples to features, in blocks: resampled by soxr's streaming resampler (the
    filter of `librosa.resample`, whose output it equals sample for sample, padded or cut to the same length at the
    end), framed with the reflect padding of `power_spectrogram` at both ends, then the values before the dB floor
    (`values`: the power spectra, or their mels for "mel_then_db"), and with the track's peak its features
    (`features`). `push` and `finish` return the values of the frames they complete, in order, in whole blocks of
    `_BLOCK_FRAMES` frames counted from the first (the last block shorter), the blocks `spectrogram` computes a whole
    track in, so that every sum is the same. The power spectra are computed into the block they belong to, which is
    given out once full: no spectrum is copied."""

    def __init__(self, settings: FeatureSettings, sample_rate: int):
        self.settings = settings
        self._half = settings.n_fft // 2
        self._resampler = None
        if sample_rate != settings.sample_rate:
            self._resampler = soxr.ResampleStream(
                sample_rate, settings.sample_rate, 1, dtype="float32", quality="soxr_hq"
            )
        self._ratio = float(settings.sample_rate) / sample_rate
        self.input_samples = 0  # at the file's rate
        self.samples = 0  # at the setting's rate, what the frames are cut from
        self.frames = 0
        self._start = np.empty(0, np.float32)  # the first samples, until the start's reflection can be made
        self._pending: np.ndarray | None = None  # the padded signal from the next frame's first sample on
        self._tail = np.empty(0, np.float32)  # the last n_fft // 2 + 1 samples, for the end's reflection
        self._block = self._new_block()  # the power spectra of the block being filled, its first `_filled` frames
        self._filled = 0

    def _new_block(self) -> np.ndarray:
        return np.empty((_BLOCK_FRAMES, self.settings.n_fft // 2 + 1), np.float32)

    def push(self, samples: np.ndarray) -> np.ndarray:
        self.input_samples += len(samples)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        return self._add(samples)

    def finish(self) -> np.ndarray:
        """The values of the last frames; ValueError for a signal too short for one frame's reflect padding."""
        values = []
        if self._resampler is not None:
            wanted = int(np.ceil(self.input_samples * self._ratio))  # librosa.resample's length, which it pads to
            last = self._resampler.resample_chunk(np.empty(0, np.float32), last=True)
            last = np.concatenate([last, np.zeros(max(0, wanted - self.samples - len(last)), np.float32)])
            values.append(self._add(last))
        if self._pending is None:
            raise ValueError(
                f"waveform has {self.samples} samples: need more than n_fft // 2 = {self._half}"
                if self.samples
                else "waveform is empty: no samples to compute a spectrogram from"
            )
        end = self._tail[-2 : -self._half - 2 : -1]  # np.pad's "reflect": the edge sample not repeated
        values.append(self._frames(np.concatenate([self._pending, end])))
        values.append(self._values([self._block[: self._filled]] if self._filled else []))
        return np.concatenate(values)

    def _add(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, np.float32)
        self.samples += len(samples)
        self._tail = np.concatenate([self._tail, samples[-(self._half + 1) :]])[-(self._half + 1) :]
        if self._pending is None:
            self._start = np.concatenate([self._start, samples])
            if len(self._start) <= self._half:
                return self._no_frames()
            samples, self._pending = self._start, self._start[self._half : 0 : -1]
            self._start = np.empty(0, np.float32)
        return self._frames(np.concatenate([self._pending, samples]))

    def _frames(self, padded: np.ndarray) -> np.ndarray:
        """The values of the blocks that the whole frames at the start of `padded` complete; `padded` is kept from
        the next frame's start."""
        n_fft, hop = self.settings.n_fft, self.settings.hop_length
        count = 0 if len(padded) < n_fft else (len(padded) - n_fft) // hop + 1
        self._pending = padded[count * hop :].copy()
        self.frames += count
        completed = []
        first = 0
        while first < count:
            taken = min(count - first, _BLOCK_FRAMES - self._filled)
            segment = padded[first * hop : (first + taken - 1) * hop + n_fft]
            power_spectrogram_of_frames(segment, n_fft, hop, out=self._block[self._filled : self._filled + taken])
            first, self._filled = first + taken, self._filled + taken
            if self._filled == _BLOCK_FRAMES:
                completed.append(self._block)
                self._block, self._filled = self._new_block(), 0
        return self._values(completed)

    def _values(self, blocks: list[np.ndarray]) -> np.ndarray:
        """The values of the power spectra of `blocks` (`_BLOCK_FRAMES` frames each but the track's last), which
        `_project` takes as the whole track's computation does."""
        if not blocks:
            return self._no_frames()
        power = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        if self.settings.order == "weighted_db_then_mel":
            return power
        settings = self.settings
        return _project(power, _mel_projection(settings.sample_rate, settings.n_fft, settings.n_mels, 1.0)).T

    def _no_frames(self) -> np.ndarray:
        bins = self.settings.n_fft // 2 + 1 if self.settings.order == "weighted_db_then_mel" else self.settings.n_mels
        return np.empty((0, bins), np.float32)

    def features(self, values: np.ndarray, peak: float) -> np.ndarray:
        """float32 (n_mels, frames) of a block of `values` (overwritten), with the whole signal's `peak` value."""
        settings = self.settings
        if settings.order == "weighted_db_then_mel":
            projection = _mel_projection(settings.sample_rate, settings.n_fft, settings.n_mels, DB_PER_NEPER)
            mels = _project(_log_in_place(values, TOP_DB, peak), projection)
            mels += _mel_of_weighting(settings.sample_rate, settings.n_fft, settings.n_mels)[:, np.newaxis]
            return mels
        return np.ascontiguousarray(_db_in_place(values, TOP_DB, peak).T)


class FileFeatures:
    """The features of an audio file (`waveform_features`'s of its whole decode, the same to the bit where BLAS sums
    the same blocks of rows alike), computed in blocks so that memory does not grow with the track's length: decoded
    `block_frames` samples at a time (`AudioFile`; by default `DECODE_BLOCK_FRAMES`), resampled and framed as they
    come (`_SignalFeatures`), and given out as blocks of frames (`blocks`). The dB floor needs the track's peak, so
    the values before it are kept until the end of the decode when they fit `buffer_bytes` (by default
    `PEAK_BUFFER_BYTES`); otherwise the file is decoded a second time.

    `measure` (which `blocks` calls first) decodes the whole file and returns its frame count: every error of the
    file (decoding, sample rate, channels, non-finite samples, too short) is raised there, before any features.
    """

    def __init__(
        self,
        audio: AudioFile,
        settings: FeatureSettings,
        *,
        resample: bool = False,
        buffer_bytes: int | None = None,
        block_frames: int | None = None,
    ):
        self.audio, self.settings, self.resample = audio, settings, resample
        self.buffer_bytes = PEAK_BUFFER_BYTES if buffer_bytes is None else buffer_bytes
        self.block_frames = DECODE_BLOCK_FRAMES if block_frames is None else block_frames
        self._peaks: list[float] | None = None
        self._buffered: list[list[np.ndarray]] | None = None
        self.frames = 0

    def _signals(self) -> list[_SignalFeatures]:
        """One `_SignalFeatures` per signal of the file: its mono mix, or each channel for a stereo setting (a mono
        file's one channel, used twice); AudioError for a sample rate or channel count the setting does not take."""
        audio, settings = self.audio, self.settings
        if audio.sample_rate != settings.sample_rate and not self.resample:
            raise AudioError(
                f"unexpected sample rate {audio.sample_rate} Hz in {audio.name} (expected {settings.sample_rate})"
            )
        if audio.channels not in (1, STEREO_CHANNELS) and (not self.resample or not settings.mono):
            raise AudioError(
                f"unexpected channel count {audio.channels} in {audio.name} (expected 1 or {STEREO_CHANNELS})"
            )
        count = 1 if settings.mono else audio.channels
        return [_SignalFeatures(settings, audio.sample_rate) for _ in range(count)]

    def _decode(self, signals: list[_SignalFeatures]) -> Iterator[list[np.ndarray]]:
        """Per decoded block, then at the end, each signal's values of the frames completed."""
        for block in self.audio.blocks(self.block_frames):
            if not np.isfinite(block).all():
                raise AudioError(f"non-finite samples decoded from {self.audio.name}")
            parts = [to_mono(block)] if self.settings.mono else [block[:, k].copy() for k in range(len(signals))]
            yield [signal.push(part) for signal, part in zip(signals, parts)]
        if not signals[0].input_samples:
            raise AudioError(f"no audio samples decoded from {self.audio.name}")
        yield [signal.finish() for signal in signals]

    def measure(self) -> int:
        """Decodes the file once (with ffmpeg after libsndfile fails part way, when it is there) and returns its
        frame count; raises the file's error (see the class)."""
        if self._peaks is not None:
            return self.frames
        try:
            self._first_decode()
        except _Undecodable as error:
            self.audio.decode_with_ffmpeg(str(error))
            self._first_decode()
        return self.frames

    def _first_decode(self) -> None:
        signals = self._signals()
        peaks = [-np.inf] * len(signals)
        buffered: list[list[np.ndarray]] | None = [[] for _ in signals]
        held = 0
        for values in self._decode(signals):
            for k, block in enumerate(values):
                if len(block):
                    peaks[k] = max(peaks[k], float(block.max()))
            if buffered is not None:
                held += sum(block.nbytes for block in values)
                if held > self.buffer_bytes:
                    buffered = None  # decoded again once the peak is known
                else:
                    for kept, block in zip(buffered, values):
                        kept.append(block)
        self._peaks, self._buffered, self.frames = peaks, buffered, signals[0].frames
        self._signal_list = signals

    def blocks(self) -> Iterator[np.ndarray]:
        """The features float32 in order, in blocks of frames: (n_mels, frames) or for a stereo setting
        (STEREO_CHANNELS, n_mels, frames), shaped as `waveform_features` says."""
        self.measure()
        signals, peaks = self._signal_list, self._peaks
        if self._buffered is not None:
            buffered, self._buffered = self._buffered, None
            steps = zip(*buffered)
        else:
            signals = self._signals()
            steps = self._decode(signals)
        try:
            yield from self._features(signals, peaks, steps)
        except _Undecodable as error:  # a second decode that fails where the first did not
            raise AudioError(f"cannot decode {self.audio.name}: {error}") from error

    def _features(
        self, signals: list[_SignalFeatures], peaks: list[float], steps: Iterable[list[np.ndarray]]
    ) -> Iterator[np.ndarray]:
        for values in steps:
            if not len(values[0]):
                continue
            mels = [signal.features(block, peak) for signal, block, peak in zip(signals, values, peaks)]
            if self.settings.mono:
                yield mels[0]
            else:
                yield np.stack(mels if len(mels) == STEREO_CHANNELS else mels * STEREO_CHANNELS)


def file_feature_blocks(
    path: str | Path, name: str, settings: FeatureSettings, *, resample: bool = False
) -> Iterator[np.ndarray]:
    """The features of an audio file in blocks of frames (`FileFeatures.blocks`), the file closed at the end."""
    with AudioFile(path, name) as audio:
        yield from FileFeatures(audio, settings, resample=resample).blocks()
