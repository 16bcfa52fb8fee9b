"""Whole-track predictions: from prepared shards during training, or from a checkpoint and audio in a notebook.

A track is cut into bounded windows (`input_pipeline.split_into_windows`); the logits of its windows are
averaged, weighted by the frames each window stands for, then turned into per-tag probabilities.
"""

import dataclasses
import functools
from typing import Any

from flax import jax_utils
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from scipy.special import expit

from data_prep import features
from data_prep.builder import PreparedDataset
from emorf_jax import checkpoints, input_pipeline, metrics
from emorf_jax.models import CPResNet


@dataclasses.dataclass(frozen=True)
class Predictions:
    probabilities: np.ndarray  # (tracks, tags), rows in the split's TSV order
    labels: np.ndarray  # (tracks, tags) bool


def _logits_step(variables: Any, spectrograms: jax.Array, *, model: CPResNet) -> jax.Array:
    return model.apply(variables, spectrograms, train=False).astype(jnp.float32)


class Predictor:
    """Predicts every track of a split of a prepared dataset with a pmapped evaluation step."""

    def __init__(self, model: CPResNet, prepared: PreparedDataset, *, window_frames: int, batch_size: int):
        self.prepared = prepared
        self.window_frames = window_frames
        self.batch_size = batch_size
        self.p_logits = jax.pmap(functools.partial(_logits_step, model=model), axis_name="batch")

    def predict(self, variables: dict[str, Any], split: str) -> Predictions:
        """Probabilities of every track of `split` (host-local `variables`), in the split's TSV order."""
        logits, labels = self._track_logits(variables, split)
        return Predictions(expit(logits), labels)

    def _track_logits(self, variables: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
        """(tracks, tags) window logits averaged by length, and the tracks' bool labels."""
        num_tracks = len(self.prepared.track_ids[split])
        num_tags = len(self.prepared.tags)
        logit_sums = np.zeros((num_tracks, num_tags), np.float64)
        weights = np.zeros(num_tracks, np.float64)
        labels = np.zeros((num_tracks, num_tags), np.float64)
        replicated = jax_utils.replicate(variables)
        windows = input_pipeline.eval_windows(self.prepared, split, self.window_frames)
        for batch in input_pipeline.eval_batches(windows, self.batch_size):
            logits = np.asarray(self.p_logits(replicated, batch.spectrograms)).reshape(len(batch.weights), -1)
            np.add.at(logit_sums, batch.track_indices, logits * batch.weights[:, None])
            np.add.at(weights, batch.track_indices, batch.weights)
            labels[batch.track_indices] = np.maximum(labels[batch.track_indices], batch.labels)
        if jax.process_count() > 1:
            logit_sums, weights, labels = (np.asarray(x).sum(axis=0) for x in multihost_utils.process_allgather(
                (logit_sums, weights, labels)))
            labels = np.minimum(labels, 1)
        missing = np.flatnonzero(weights == 0)
        if missing.size:
            raise RuntimeError(f"{missing.size} tracks of {split} got no window, e.g. "
                               f"{self.prepared.track_ids[split][missing[0]]}")
        return logit_sums / weights[:, None], labels > 0

    def evaluate(self, variables: dict[str, Any], split: str) -> dict[str, float]:
        """Macro PR-AUC and ROC-AUC and the mean BCE of the track-level logits, for validation and selection."""
        logits, labels = self._track_logits(variables, split)
        figures = metrics.mediaeval_metrics(labels, expit(logits))
        loss = np.mean(np.logaddexp(0.0, logits) - labels * logits)  # BCE on logits
        return {"loss": float(loss), "PR-AUC-macro": figures["PR-AUC-macro"],
                "ROC-AUC-macro": figures["ROC-AUC-macro"]}


_jitted_logits = jax.jit(_logits_step, static_argnames="model")


@dataclasses.dataclass(frozen=True)
class Tagger:
    """A trained model loaded from a checkpoint, ready to tag audio: all it needs comes from the checkpoint."""

    model: CPResNet
    variables: dict[str, Any]
    meta: dict[str, Any]

    @property
    def tags(self) -> list[str]:
        return self.meta["tags"]

    def tag_spectrogram(self, spectrogram: np.ndarray, window_frames: int = 1722) -> np.ndarray:
        """Per-tag probabilities of one track's (n_mels, frames) spectrogram in the checkpoint's feature setting."""
        norm = self.meta["normalisation"]
        spectrogram = input_pipeline.normalise(spectrogram.astype(np.float32), np.asarray(norm["mean"], np.float32),
                                               np.asarray(norm["std"], np.float32))
        windows = input_pipeline.split_into_windows(spectrogram, window_frames)
        inputs = np.stack([w for w, _ in windows])[..., None]
        logits = np.asarray(_jitted_logits(self.variables, inputs, model=self.model))
        weights = np.array([weight for _, weight in windows], np.float64)
        return expit((logits * weights[:, None]).sum(axis=0) / weights.sum())

    def tag_audio(self, waveform: np.ndarray, sample_rate: int, window_frames: int = 1722) -> dict[str, float]:
        """{tag: probability} for a waveform, computing the features exactly as the training shards did."""
        settings = self.meta["features"]
        if settings["source"] != "audio":
            raise ValueError(f"this model was trained on {settings['source']!r} input, not audio: pass that input "
                             "to tag_spectrogram")
        if settings["sample_rate"] != sample_rate:
            raise ValueError(f"the model was trained on {settings['sample_rate']} Hz audio, got {sample_rate} Hz; "
                             "resample first (e.g. librosa.resample)")
        options = {k: settings[k] for k in ("n_fft", "hop_length", "n_mels", "order")}
        spectrogram = features.spectrogram(waveform, sample_rate, **options)
        return dict(zip(self.tags, self.tag_spectrogram(spectrogram, window_frames).tolist()))


def load_tagger(path: str) -> Tagger:
    """A Tagger from any checkpoint of a run (e.g. `runs/demo/swa`, `runs/demo/snapshots/120`); no config needed."""
    variables, meta = checkpoints.load_checkpoint(path)
    return Tagger(CPResNet(**meta["model"]), variables, meta)
