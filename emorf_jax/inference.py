"""Whole-track predictions: from prepared shards during training, or from a checkpoint and audio in a notebook.

Both paths cut a track with `input_pipeline.window_ranges` and feed the same float16 features (the precision the
shards store), normalised on the device by `input_pipeline.model_input`, so a checkpoint tags a track's audio
exactly as the evaluation scored it. The logits of a track's windows are averaged, weighted by the frames each
window stands for, then turned into per-tag probabilities. See docs/architecture.md, "Evaluation and tagging".
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import jax_utils
from jax.experimental import multihost_utils
from scipy.special import expit

from data_prep import features
from data_prep.reader import STORED_DTYPE, PreparedDataset
from emorf_jax import checkpoints, input_pipeline, metrics
from emorf_jax.models import registry


@dataclasses.dataclass(frozen=True)
class Predictions:
    probabilities: np.ndarray  # (tracks, tags), rows in `track_ids` order
    labels: np.ndarray  # (tracks, tags) bool
    track_ids: tuple[str, ...]


def _logits_step(variables: Any, stored: jax.Array, mean: jax.Array, std: jax.Array, *, model: nn.Module) -> jax.Array:
    """Logits of a batch of stored-format windows, normalised on the device by `input_pipeline.model_input`."""
    return model.apply(variables, input_pipeline.model_input(stored, mean, std), train=False).astype(jnp.float32)


class Predictor:
    """Predicts every track of a split of a prepared dataset with a pmapped evaluation step."""

    def __init__(self, model: nn.Module, prepared: PreparedDataset, *, window_frames: int, batch_size: int):
        self.prepared = prepared
        self.window_frames = window_frames
        self.batch_size = batch_size
        self.p_logits = jax.pmap(
            functools.partial(_logits_step, model=model), axis_name="batch", in_axes=(0, 0, None, None)
        )

    def predict(self, variables: dict[str, Any], split: str) -> Predictions:
        """Probabilities of every track of `split` in the shards (host-local `variables`), in TSV order."""
        logits = self._track_logits(variables, split)
        part = self.prepared.parts[split]
        return Predictions(expit(logits), part.labels, part.track_ids)

    def _track_logits(self, variables: dict[str, Any], split: str) -> np.ndarray:
        """(tracks, tags) window logits averaged by length.

        Every process runs the same schedule and gathers the float32 logits of all windows, so every process
        (and a single process with as many devices) sums the same numbers in the same order.
        """
        part = self.prepared.parts[split]
        schedule = input_pipeline.eval_schedule(part.frames, self.window_frames, self.batch_size)
        replicated = jax_utils.replicate(variables)
        mean, std = self.prepared.mean, self.prepared.std
        local = [
            np.asarray(self.p_logits(replicated, batch.spectrograms, mean, std)).reshape(len(batch.windows), -1)
            for batch in input_pipeline.eval_batches(self.prepared, split, schedule)
        ]
        local = np.stack(local)  # (batches, local share, tags)
        if jax.process_count() > 1:  # (processes, batches, share, tags) -> each batch's shares in process order
            local = np.swapaxes(multihost_utils.process_allgather(local), 0, 1)
        logits = local.reshape(-1, local.shape[-1])
        windows = [window for batch in schedule for window in batch]
        tracks = np.array([w.track_index for w in windows])
        weights = np.array([w.weight for w in windows], np.float64)
        logit_sums = np.zeros((len(part), len(self.prepared.tags)), np.float64)
        np.add.at(logit_sums, tracks, logits * weights[:, None])
        track_weights = np.bincount(tracks, weights, minlength=len(part))
        missing = np.flatnonzero(track_weights == 0)
        if missing.size:
            raise RuntimeError(f"{missing.size} tracks of {split} got no window, e.g. {part.track_ids[missing[0]]}")
        return logit_sums / track_weights[:, None]

    def evaluate(self, variables: dict[str, Any], split: str) -> dict[str, float]:
        """Macro PR-AUC and ROC-AUC and the mean BCE of the track-level logits, for validation and selection."""
        logits = self._track_logits(variables, split)
        labels = self.prepared.parts[split].labels
        figures = metrics.mediaeval_metrics(labels, expit(logits))
        loss = np.mean(np.logaddexp(0.0, logits) - labels * logits)  # BCE on logits
        return {"loss": float(loss), "PR-AUC-macro": figures["PR-AUC-macro"], "ROC-AUC-macro": figures["ROC-AUC-macro"]}


_jitted_logits = jax.jit(_logits_step, static_argnames="model")


def padded_batch_size(windows: int, batch_size: int) -> int:
    """The batch that `windows` windows (at most `batch_size`) run in: the smallest power of two that holds them,
    at most `batch_size`. A track's last, shorter group so wastes less than half of its batch instead of up to all
    but one window (a 180-s track: 10 windows run as 8 + 2, not 8 + 8), for a few more compiled shapes."""
    return min(batch_size, 1 << (windows - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Tagger:
    """A trained model loaded from a checkpoint, ready to tag audio: all it needs comes from the checkpoint.

    Windows go through the model in batches of `batch_size`, the last one padded to `padded_batch_size`, so neither
    memory nor compilation depends on a track's length: at most log2(batch_size) + 1 batch shapes (a track shorter
    than one window is the only other window shape).
    """

    model: nn.Module
    variables: dict[str, Any]
    meta: dict[str, Any]
    batch_size: int = 8

    @property
    def tags(self) -> list[str]:
        return self.meta["tags"]

    @property
    def window_frames(self) -> int:
        """The evaluation window the model was validated with."""
        return int(self.meta["window_frames"])

    def window_logits(self, spectrogram: np.ndarray, window_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(windows, tags) logits and (windows,) weights of one track's (n_mels, frames) spectrogram."""
        norm = self.meta["normalisation"]
        mean, std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
        stored = np.asarray(spectrogram).astype(STORED_DTYPE).T  # as data preparation stores it: time-major
        ranges = input_pipeline.window_ranges(stored.shape[0], window_frames or self.window_frames)
        logits = []
        for first in range(0, len(ranges), self.batch_size):
            group = ranges[first : first + self.batch_size]
            windows = np.stack([stored[start:stop] for start, stop, _ in group])
            padding = padded_batch_size(len(group), self.batch_size) - len(group)
            padded = np.concatenate([windows, np.zeros((padding,) + windows.shape[1:], windows.dtype)])
            logits.append(np.asarray(_jitted_logits(self.variables, padded, mean, std, model=self.model))[: len(group)])
        return np.concatenate(logits), np.array([weight for _, _, weight in ranges], np.float64)

    def tag_spectrogram(self, spectrogram: np.ndarray, window_frames: int | None = None) -> np.ndarray:
        """Per-tag probabilities of one track's (n_mels, frames) spectrogram in the checkpoint's feature setting."""
        logits, weights = self.window_logits(spectrogram, window_frames)
        return expit((logits * weights[:, None]).sum(axis=0) / weights.sum())

    def spectrogram(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """The (n_mels, frames) features of a waveform (samples,) or (samples, channels) at any sample rate and
        channel count, computed by data preparation's own code, mixed down and resampled to the model's rate."""
        settings = features.FeatureSettings(**self.meta["features"])
        if settings.source != "audio":
            raise ValueError(
                f"this model was trained on {settings.source!r} input, not audio: pass that input to tag_spectrogram"
            )
        waveform = np.asarray(waveform, np.float32)
        waveform = waveform[:, None] if waveform.ndim == 1 else waveform
        return features.waveform_features(waveform, sample_rate, "the waveform", settings, resample=True)

    def tag_audio(self, waveform: np.ndarray, sample_rate: int, window_frames: int | None = None) -> dict[str, float]:
        """{tag: probability} for a waveform (samples,) or (samples, channels) of the whole track."""
        probabilities = self.tag_spectrogram(self.spectrogram(waveform, sample_rate), window_frames)
        return dict(zip(self.tags, probabilities.tolist()))


def load_tagger(path: str, batch_size: int = 8) -> Tagger:
    """A Tagger from any checkpoint of a run (e.g. `runs/demo/swa`, `runs/demo/snapshots/120`) of any model; no
    config needed (the model is rebuilt from `meta["model"]` by the registry)."""
    variables, meta = checkpoints.load_checkpoint(path)
    return Tagger(registry.build(meta["model"]), variables, meta, batch_size)
