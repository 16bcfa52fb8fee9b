"""Tags music with one checkpoint or the average of several: what `python -m emorf_jax.predict`, the notebook and
the benchmarks share.

All a tagger needs comes from its checkpoints' meta: the model (rebuilt by the registry), tags, feature setting,
normalisation and evaluation window. A track's features are computed by data preparation's own code (any sample rate,
resampled; any channel count mixed down, or one or two channels for a stereo model), rounded to the float16 the
shards store (`track_features`), cut into the evaluation's windows (`windowing.window_ranges`) and run through
`split_predictions.window_outputs`, the logits of the step the evaluation pmaps, so a checkpoint tags a track's audio
exactly as the evaluation scored it. Each checkpoint's window logits are averaged, weighted by the frames each window
stands for, and turned into probabilities; several checkpoints' probabilities are averaged. The same step gives each
window's embedding, the pooled features the model's classifier reads (`TrackTags`). With the "onnxruntime" backend, the
same batches of the same stored windows run through each checkpoint's exported ONNX model instead (`export.cached_onnx`:
logits and embedding, normalisation inside), a short clip at its own length.
"""

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from scipy.special import expit

from data_prep import features
from data_prep.metadata import short_tag_name
from data_prep.reader import STORED_DTYPE
from emorf_jax import checkpoints, export, split_predictions, track_features
from emorf_jax.models import receptive_field, registry
from emorf_jax.models.cp_resnet import MIN_INPUT_SIZE, CPResNet

# The files a folder is searched for. libsndfile decodes the first eight (`features.decode_audio`); M4A/AAC and WMA go
# through ffmpeg when it is on the PATH, and without it each such file gets its own error saying to install ffmpeg.
AUDIO_SUFFIXES = (*features.LIBSNDFILE_SUFFIXES, ".m4a", ".aac", ".wma")

_jitted_window_outputs = jax.jit(split_predictions.window_outputs, static_argnames="model")

BACKENDS = ("jax", "onnxruntime")
# An int8 model's activation ranges come from this many windows of audio, at most a few per file so that one long
# track does not set them alone (`calibration_windows`).
CALIBRATION_WINDOWS = 64
CALIBRATION_WINDOWS_PER_FILE = 4


def default_backend(metas: Sequence[dict[str, Any]]) -> str:
    """onnxruntime where the models run on a CPU and all are of the CP-ResNet family (what the ONNX export carries):
    the same probabilities, faster than XLA:CPU (benchmarks/RESULTS.md); jax on a GPU or TPU, and for a baseline."""
    exportable = all(registry.model_name(meta["model"]) == "cp_resnet" for meta in metas)
    return "onnxruntime" if exportable and jax.default_backend() == "cpu" else "jax"


def default_batch_size(backend: str) -> int:
    """Windows per model call: 2 where the model runs on a CPU (onnxruntime, or JAX without an accelerator), where
    2 is faster than 8 and holds 2.5x less memory (benchmarks/RESULTS.md); 8 on a GPU or TPU."""
    return 2 if backend == "onnxruntime" or jax.default_backend() == "cpu" else 8


def padded_batch_size(windows: int, batch_size: int) -> int:
    """The batch that `windows` windows (at most `batch_size`) run in: the smallest power of two that holds them,
    at most `batch_size`. A track's last, shorter group so wastes less than half of its batch instead of up to all
    but one window (a 180-s track: 10 windows run as 8 + 2, not 8 + 8), for a few more compiled shapes."""
    return min(batch_size, 1 << (windows - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Member:
    """One trained model: its module, weights and checkpoint meta, and with the onnxruntime backend the
    onnxruntime InferenceSession of its exported model, which then runs its windows."""

    model: nn.Module
    variables: dict[str, Any]
    meta: dict[str, Any]
    session: Any = None


@dataclasses.dataclass(frozen=True)
class TrackTags:
    """What a tagger says of one track, averaged over its members."""

    probabilities: np.ndarray  # (tags,) of the whole track
    windows: list[tuple[int, int, int]]  # (start, stop, weight) frames, as `windowing.window_ranges` cuts them
    window_probabilities: np.ndarray  # (windows, tags): the taggram
    # (windows, features) float32: each window's pooled features that the classifier reads, the members' side by
    # side (`split_predictions.window_outputs`; 4 x base_channels values for a CP-ResNet)
    window_embeddings: np.ndarray
    # (features,) float32: the window embeddings averaged with the window weights, as the logits are; every model's
    # head is affine, so a member's track logits are its head applied to its part of this vector
    embedding: np.ndarray


@dataclasses.dataclass(frozen=True)
class Tagger:
    """One or several members that share tags, features and normalisation, whose probabilities are averaged.

    Windows go through each model in batches of `batch_size`, the last one padded to `padded_batch_size`, so neither
    memory nor compilation depends on a track's length: at most log2(batch_size) + 1 batch shapes. A clip shorter
    than one window is zero-padded to the window and run with its length (`CPResNet`'s `frames`), which gives its
    unpadded outputs in one more shape for every clip length; the baselines, whose pools and GRU depend on the input's
    length, run such a clip in its own shape. The window length and feature setting are the first member's.
    """

    members: tuple[Member, ...]
    batch_size: int = 8

    @property
    def meta(self) -> dict[str, Any]:
        """The first member's meta, whose tags, features and normalisation every member shares."""
        return self.members[0].meta

    @property
    def tags(self) -> list[str]:
        return self.meta["tags"]

    @property
    def window_frames(self) -> int:
        """The evaluation window the first model was validated with."""
        return int(self.meta["window_frames"])

    @property
    def embedding_size(self) -> int:
        """Values in an embedding: the members' pooled features side by side (e.g. 512 for a CP-ResNet of width
        128), from the models' output shapes (traced, not run)."""
        mean = np.asarray(self.meta["normalisation"]["mean"], np.float32)
        window = jax.ShapeDtypeStruct((1, self.window_frames, *mean.shape), STORED_DTYPE)
        return sum(
            jax.eval_shape(
                functools.partial(split_predictions.window_outputs, model=member.model),
                member.variables,
                window,
                mean,
                mean,
            )[1].shape[-1]
            for member in self.members
        )

    @property
    def seconds_per_frame(self) -> float:
        """The time step of the features, for time axes."""
        return self.meta["features"]["hop_length"] / self.meta["features"]["sample_rate"]

    @property
    def feature_settings(self) -> features.FeatureSettings:
        """The audio feature setting of the models (ValueError for a model of other input)."""
        return track_features.audio_settings(self.meta["features"])

    def spectrogram(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """The features of a waveform (samples,) or (samples, channels) at any sample rate, computed by data
        preparation's own code, resampled to the model's rate: (n_mels, frames) of any channel count mixed down, or
        for a stereo model (2, n_mels, frames) of one or two channels (`features.waveform_features`)."""
        waveform = np.asarray(waveform, np.float32)
        waveform = waveform[:, None] if waveform.ndim == 1 else waveform
        return track_features.waveform_features(waveform, sample_rate, "the waveform", self.feature_settings)

    def read_features(self, path: str | Path) -> np.ndarray:
        """`spectrogram` of an audio file; an unreadable file raises OSError or features.AudioError, naming it."""
        return track_features.file_features(path, self.feature_settings)

    def window_logits(
        self, spectrogram: np.ndarray, window_frames: int | None = None
    ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """(members, windows, tags) logits of one track's (n_mels, frames) or stereo (2, n_mels, frames) features,
        and its windows."""
        logits, _, windows = self.window_outputs(track_features.stored(spectrogram), window_frames)
        return logits, windows

    def window_outputs(
        self, stored: np.ndarray, window_frames: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
        """(members, windows, tags) logits and (windows, features) embeddings, the members' side by side, of one
        track's features in the stored format (`track_features.stored`), and its windows."""
        return self.streamed_window_outputs([stored], window_frames)

    def streamed_window_outputs(
        self, blocks: Iterable[np.ndarray], window_frames: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
        """`window_outputs` of a track whose stored features come in blocks of frames (`track_features.stored` of
        each): every window runs as soon as its frames are there, in the batches `window_outputs` makes of the
        whole track, so memory holds a window and a batch, not the track."""
        norm = self.meta["normalisation"]
        mean, std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
        window_frames = window_frames or self.window_frames
        windows, group = [], []
        logits, embeddings = [[] for _ in self.members], [[] for _ in self.members]

        def run(group: list[np.ndarray]) -> None:
            for member, member_logits, member_embeddings in zip(self.members, logits, embeddings):
                # An ONNX model takes any length, so a short clip runs unpadded: what the JAX path's `frames` emulates.
                pad_to = window_frames if isinstance(member.model, CPResNet) and member.session is None else None
                count, batch, frames = self._batch(group, pad_to)
                if member.session is None:
                    out = _jitted_window_outputs(member.variables, batch, mean, std, frames, model=member.model)
                else:
                    out = member.session.run(None, {export.INPUT_NAME: batch})
                member_logits.append(np.asarray(out[0])[:count])
                member_embeddings.append(np.asarray(out[1])[:count])

        for start, stop, weight, window in track_windows(blocks, window_frames):
            if self.members[0].session is not None and stop < MIN_INPUT_SIZE:
                raise ValueError(f"{stop} frames: the model takes at least {MIN_INPUT_SIZE}")
            windows.append((start, stop, weight))
            group.append(window)
            if len(group) == self.batch_size:
                run(group)
                group = []
        if group:
            run(group)
        return (
            np.stack([np.concatenate(member_logits) for member_logits in logits]),
            np.concatenate([np.concatenate(member_embeddings) for member_embeddings in embeddings], axis=1),
            windows,
        )

    def _batch(self, group: list[np.ndarray], pad_to: int | None) -> tuple[int, np.ndarray, np.ndarray | None]:
        """(windows in it, padded batch, valid frames per window or None) of a group of at most `batch_size`
        consecutive windows of a track's stored (frames, *frame_shape) features. With `pad_to`, a clip shorter than
        that (and not shorter than a CP-ResNet takes, whose own error then names it) is zero-padded to it in time,
        with its length as frames."""
        stacked = np.stack(group)
        padding = padded_batch_size(len(stacked), self.batch_size) - len(stacked)
        batch = np.concatenate([stacked, np.zeros((padding, *stacked.shape[1:]), stacked.dtype)])
        frames = None
        if pad_to is not None and MIN_INPUT_SIZE <= batch.shape[1] < pad_to:
            frames = np.full(len(batch), batch.shape[1], np.int32)
            batch = np.pad(batch, [(0, 0), (0, pad_to - batch.shape[1])] + [(0, 0)] * (batch.ndim - 2))
        return len(stacked), batch, frames

    def tag_spectrogram(self, spectrogram: np.ndarray, window_frames: int | None = None) -> TrackTags:
        """The tags of one track's features in the checkpoints' setting (shaped as `spectrogram` returns them)."""
        return self.tag_stored(track_features.stored(spectrogram), window_frames)

    def tag_stored(self, stored: np.ndarray, window_frames: int | None = None) -> TrackTags:
        """The tags of one track's features in the stored format (`track_features.stored`)."""
        return self.tag_blocks([stored], window_frames)

    def tag_blocks(self, blocks: Iterable[np.ndarray], window_frames: int | None = None) -> TrackTags:
        """The tags of one track whose stored features come in blocks of frames, each window run as soon as its
        frames are there (`streamed_window_outputs`): what a feature process of `emorf_jax.predict` sends."""
        logits, window_embeddings, windows = self.streamed_window_outputs(blocks, window_frames)
        weights = np.array([weight for _, _, weight in windows], np.float64)
        track = [expit((member_logits * weights[:, None]).sum(axis=0) / weights.sum()) for member_logits in logits]
        embedding = (window_embeddings * weights[:, None]).sum(axis=0) / weights.sum()
        return TrackTags(
            np.mean(track, axis=0),
            windows,
            np.mean(expit(logits), axis=0),
            window_embeddings,
            embedding.astype(np.float32),
        )

    def tag_file(self, path: str | Path, window_frames: int | None = None) -> TrackTags:
        """The tags of an audio file (see `read_features` for the errors), its features computed in blocks and its
        windows run as they are ready, so that memory does not grow with the track's length."""
        return self.tag_blocks(track_features.stored_file_blocks(str(path), self.feature_settings), window_frames)

    def tag_audio(self, waveform: np.ndarray, sample_rate: int, window_frames: int | None = None) -> dict[str, float]:
        """{tag: probability} for a waveform (samples,) or (samples, channels) of the whole track."""
        probabilities = self.tag_spectrogram(self.spectrogram(waveform, sample_rate), window_frames).probabilities
        return dict(zip(self.tags, probabilities.tolist()))


def track_windows(blocks: Iterable[np.ndarray], window_frames: int) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """(start, stop, weight, frames) of each window of `windowing.window_ranges` over a track whose (frames, ...)
    features come in `blocks`, each as soon as its frames are there: the whole windows while they come, then the
    last one (aligned to the track's end) or a track shorter than one window whole. Only the last `window_frames`
    frames are kept between blocks."""
    recent, recent_start, total, emitted = None, 0, 0, 0
    for block in blocks:
        recent = block if recent is None else np.concatenate([recent, block])
        total += len(block)
        while (emitted + 1) * window_frames <= total:
            start = emitted * window_frames
            yield (
                start,
                start + window_frames,
                window_frames,
                recent[start - recent_start : start - recent_start + window_frames],
            )
            emitted += 1
        keep_from = max(recent_start, total - window_frames)
        recent, recent_start = recent[keep_from - recent_start :], keep_from
    if recent is None or total == 0:
        raise ValueError("no frames: the track has no features")
    if total < window_frames:
        yield 0, total, total, recent
    elif total % window_frames:
        yield total - window_frames, total, total - emitted * window_frames, recent[-window_frames:]


def load_tagger(
    paths: str | Sequence[str],
    batch_size: int | None = None,
    backend: str | None = None,
    precision: str = "float32",
    calibration_files: Sequence[str] = (),
) -> Tagger:
    """A Tagger of one checkpoint or the average of several, from any checkpoint of a run (e.g. `runs/demo/swa`,
    `runs/demo/snapshots/120`) of any model; no config needed (each model is rebuilt from `meta["model"]`). Raises
    ValueError, naming the checkpoint, when they do not share tags, features and normalisation. `backend`
    "onnxruntime" runs each checkpoint's exported ONNX model (the CP-ResNet family only: `export.UnsupportedModel`,
    a ValueError, for a baseline); with `precision` "int8" its int8 copy, calibrated on windows of
    `calibration_files` (`calibration_windows`). None: `default_backend` of the checkpoints, and its
    `default_batch_size`."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if precision not in export.PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(export.PRECISIONS)}")
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("no checkpoint to load")
    loaded = [(path, *checkpoints.load_checkpoint(path)) for path in paths]
    checkpoints.check_compatible([(path, meta) for path, _, meta in loaded])
    backend = backend or default_backend([meta for _, _, meta in loaded])
    if precision != "float32" and backend != "onnxruntime":
        raise ValueError(f"precision {precision}: only the onnxruntime backend runs it (add --backend=onnxruntime)")
    calibration = None
    if precision == "int8":
        meta = loaded[0][2]
        settings = track_features.audio_settings(meta["features"])
        calibration = export.Calibration(
            files_key(calibration_files),
            functools.partial(calibration_windows, calibration_files, settings, int(meta["window_frames"])),
        )
    sessions = [_onnx_session(path, calibration) if backend == "onnxruntime" else None for path in paths]
    members = tuple(
        Member(registry.build(meta["model"]), variables, meta, session)
        for (_, variables, meta), session in zip(loaded, sessions)
    )
    return Tagger(members, batch_size or default_batch_size(backend))


def calibration_windows(
    files: Sequence[str],
    settings: features.FeatureSettings,
    window_frames: int,
    count: int = CALIBRATION_WINDOWS,
    per_file: int = CALIBRATION_WINDOWS_PER_FILE,
) -> list[np.ndarray]:
    """Up to `count` stored windows, at most `per_file` from each of `files` in order (a file that cannot be read is
    passed over): the inputs whose activation ranges set an int8 model's scales. ValueError if none can be read."""
    windows, unreadable = [], []
    for path in files:
        if len(windows) == count:
            break
        try:
            with contextlib.closing(track_features.stored_file_blocks(str(path), settings)) as blocks:
                first = list(
                    itertools.islice(track_windows(blocks, window_frames), min(per_file, count - len(windows)))
                )
        except (OSError, ValueError) as error:
            unreadable.append(f"{path}: {error}")
            continue
        windows += [window for start, stop, _, window in first if stop - start >= MIN_INPUT_SIZE]
    if not windows:
        raise ValueError(
            "int8 needs audio to calibrate its activation ranges: none of the calibration files could be read"
            + "".join(f"\n  {line}" for line in unreadable[:3])
        )
    return windows


def files_key(files: Sequence[str]) -> str:
    """A name of the calibration files that changes when any of them does: each path with its size and modification
    time (what `make` trusts), read without decoding anything."""
    digest = hashlib.sha256()
    for path in map(str, files):
        try:
            status = os.stat(path)
            digest.update(f"{path}\0{status.st_size}\0{status.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0unreadable\n".encode())
    return digest.hexdigest()


def _onnx_session(checkpoint: str, calibration: export.Calibration | None = None) -> Any:
    """An onnxruntime CPU session of the checkpoint's exported model (`export.cached_onnx`), its int8 copy with a
    `calibration`."""
    try:
        import onnxruntime  # in the plain install; imported here, by the backend that runs it
    except ImportError as error:
        raise ImportError(f"the onnxruntime backend needs onnxruntime; {export.INSTALL_HINT}") from error
    model = export.cached_onnx(checkpoint, calibration=calibration)
    return onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def audio_files(paths: Sequence[str]) -> list[Path]:
    """The files named, and the audio files (`AUDIO_SUFFIXES`) below the folders named, in a stable order."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        else:
            found.append(path)  # a missing or non-audio file is reported when it is read
    return found


def top_tags(probabilities: np.ndarray, tags: Sequence[str], top_k: int) -> list[tuple[str, float]]:
    """The `top_k` most probable tags, most probable first, as (short name, probability)."""
    return [(short_tag_name(tags[i]), float(probabilities[i])) for i in np.argsort(-probabilities)[:top_k]]


def format_top_tags(probabilities: np.ndarray, tags: Sequence[str], top_k: int) -> str:
    """`calm 0.812  dark 0.301`: the top-k tags with their probabilities, as `predict` shows them."""
    return "  ".join(f"{name} {probability:.3f}" for name, probability in top_tags(probabilities, tags, top_k))


def top_tags_line(path: str, probabilities: np.ndarray, tags: Sequence[str], top_k: int) -> str:
    """The line `predict` shows for a file: its path and its top-k tags with their probabilities."""
    return f"{path}\t{format_top_tags(probabilities, tags, top_k)}"


def model_card(path: str) -> str:
    """What a checkpoint is, from its meta alone (no ONNX export: the JAX backend runs nothing until asked)."""
    tagger = load_tagger(path, backend="jax")
    meta = tagger.meta
    model, settings = meta["model"], meta["features"]
    frame_seconds = tagger.seconds_per_frame
    lines = [
        f"checkpoint       {os.path.abspath(path)} ({meta['kind']}, step {meta['step']}, epoch {meta['epoch']:.2f})",
        f"model            {registry.describe(model)}",
    ]
    if registry.model_name(model) == "cp_resnet":
        lines.append(
            f"receptive field  {receptive_field.published_rf(model['rho'])} frames as published, "
            f"{receptive_field.exact_rf(model['rho'])} exact"
        )
    lines += [
        f"features         {settings['n_mels']} mel bands, {settings['sample_rate']} Hz, n_fft {settings['n_fft']}, "
        f"hop {settings['hop_length']}, {settings['order']}{'' if settings['mono'] else ', stereo'}",
        f"window           {meta['window_frames']} frames ({meta['window_frames'] * frame_seconds:.1f} s)",
        f"training data    split {meta['dataset']['split_index']} of {meta['dataset']['config_name']}, "
        f"{meta['dataset']['training_tracks']} tracks, crops of {meta['dataset']['crop_frames']} frames, "
        f"batch {meta['dataset']['batch_size']}",
    ]
    if "validation" in meta:
        lines.append("validation       " + ", ".join(f"{k} {v:.4f}" for k, v in meta["validation"].items()))
    lines.append(f"thresholds       {'per tag, from validation' if checkpoints.THRESHOLDS in meta else 'none stored'}")
    lines.append("tags             " + " ".join(short_tag_name(tag) for tag in meta["tags"]))
    return "\n".join(lines)
