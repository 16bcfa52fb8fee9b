"""Whole-split predictions from prepared shards, for evaluation during training and ensembles of checkpoints.

`logits_step` is the one function that runs a model on windows: `Predictor` pmaps it over the shards' windows and
`emorf_jax.tagger` jits it for a track's audio, both feeding the float16 features the shards store, normalised on
the device by `windowing.model_input`, so a checkpoint tags a track's audio exactly as the evaluation scored
it. A track's window logits are averaged, weighted by the frames each window stands for, then turned into per-tag
probabilities. See docs/architecture.md, "Evaluation and tagging".
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

from data_prep.reader import PreparedDataset
from emorf_jax import losses, windowing


@dataclasses.dataclass(frozen=True)
class Predictions:
    probabilities: np.ndarray  # (tracks, tags), rows in `track_ids` order
    labels: np.ndarray  # (tracks, tags) bool
    track_ids: tuple[str, ...]


# A model with the authors' frequency roll (`features_shift`) draws it at evaluation too, as theirs does: from this
# one seed for every batch, so that a window's logits do not depend on the batch it is in (docs/fidelity.md).
EVALUATION_SHIFT_SEED = 0


def logits_step(variables: Any, stored: jax.Array, mean: jax.Array, std: jax.Array, *, model: nn.Module) -> jax.Array:
    """Logits of a batch of stored-format windows, normalised on the device by `windowing.model_input`."""
    return window_outputs(variables, stored, mean, std, model=model)[0]


def window_outputs(
    variables: Any,
    stored: jax.Array,
    mean: jax.Array,
    std: jax.Array,
    frames: jax.Array | None = None,
    *,
    model: nn.Module,
) -> tuple[jax.Array, jax.Array]:
    """`logits_step`'s logits and the pooled features the model's classifier reads (its intermediates
    "embedding"), float32 (batch, features). `frames`: a CP-ResNet's valid frames per window of a batch padded in
    time (`CPResNet`); the embeddings cost nothing where only the logits are used (XLA drops what is not returned)."""
    inputs = windowing.model_input(stored, mean, std)
    rngs = {"shift": jax.random.PRNGKey(EVALUATION_SHIFT_SEED)}
    padding = {} if frames is None else {"frames": frames}
    logits, state = model.apply(variables, inputs, train=False, rngs=rngs, mutable=["intermediates"], **padding)
    return logits.astype(jnp.float32), state["intermediates"]["embedding"][0].astype(jnp.float32)


class Predictor:
    """Predicts every track of a split of a prepared dataset with a pmapped evaluation step."""

    def __init__(self, model: nn.Module, prepared: PreparedDataset, *, window_frames: int, batch_size: int):
        self.prepared = prepared
        self.window_frames = window_frames
        self.batch_size = batch_size
        self.p_logits = jax.pmap(
            functools.partial(logits_step, model=model), axis_name="batch", in_axes=(0, 0, None, None)
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
        schedule = windowing.eval_schedule(part.frames, self.window_frames, self.batch_size)
        replicated = jax_utils.replicate(variables)
        mean, std = self.prepared.mean, self.prepared.std
        local = [
            np.asarray(self.p_logits(replicated, batch.spectrograms, mean, std)).reshape(len(batch.windows), -1)
            for batch in windowing.eval_batches(self.prepared, split, schedule)
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

    def evaluate(self, variables: dict[str, Any], split: str, *, pos_weight: float) -> dict[str, float]:
        """Macro PR-AUC and ROC-AUC and the loss of the track-level logits (the training loss without mixup, with
        its `pos_weight`: the authors selected on their criterion's validation loss), for validation and selection."""
        from emorf_jax import metrics  # here: tagging uses this module but never scores, and sklearn takes 0.8 s

        logits = self._track_logits(variables, split)
        labels = self.prepared.parts[split].labels
        figures = metrics.mediaeval_metrics(labels, expit(logits), tag_names=self.prepared.tags)
        loss = losses.bce_with_logits(jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.float32), pos_weight)
        return {
            "loss": float(loss.mean()),
            "PR-AUC-macro": figures["PR-AUC-macro"],
            "ROC-AUC-macro": figures["ROC-AUC-macro"],
        }
