"""The training objective: mixup of the global batch and the authors' positive-weighted BCE on logits.

The one home of the loss: the train step (`train.py`) minimises `training_loss`, and the validation loss that selects
a model (`split_predictions.Predictor.evaluate`) is `bce_with_logits` with the same positive weight. The evidence for
each choice (`config.loss`) is in docs/fidelity.md, "Training".
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

MIXUP_REDUCTIONS = ("batch_mean", "per_example")


class MixedBatch(NamedTuple):
    """Mixup's share of one device: its examples' inputs mixed with their partners', and what the loss needs to
    weigh the two targets."""

    inputs: jax.Array  # λ_i·x_i + (1-λ_i)·x_partner(i)
    partner_targets: jax.Array  # y_partner(i), (local examples, tags)
    lam: jax.Array  # λ_i ≥ 0.5 of this device's examples, (local examples,)
    mean_lam: jax.Array  # the mean λ of the GLOBAL batch, the authors' weight of the two losses


def mixup(
    rng: jax.Array, inputs: jax.Array, targets: jax.Array, alpha: float, axis_name: str | None = None
) -> MixedBatch:
    """Per-example λ ~ Beta(α, α) made ≥ 0.5, each example mixed with a partner drawn by a permutation of the
    GLOBAL batch, whatever the number of devices.

    Under pmap (`axis_name`), every device gathers the global batch and draws the same λs and permutation from
    the same `rng`, then mixes its own examples; `mean_lam` is the mean of all the global batch's λs, so that the
    loss of N devices is the loss of one device with the same global batch.
    """
    local = inputs.shape[0]
    if axis_name is None:
        all_inputs, all_targets, offset = inputs, targets, 0
    else:
        all_inputs = jax.lax.all_gather(inputs, axis_name, tiled=True)
        all_targets = jax.lax.all_gather(targets, axis_name, tiled=True)
        offset = jax.lax.axis_index(axis_name) * local
    lambda_rng, permutation_rng = jax.random.split(rng)
    global_size = all_inputs.shape[0]
    all_lam = jax.random.beta(lambda_rng, alpha, alpha, (global_size,))
    all_lam = jnp.maximum(all_lam, 1.0 - all_lam)
    lam = jax.lax.dynamic_slice_in_dim(all_lam, offset, local)
    partners = jax.lax.dynamic_slice_in_dim(jax.random.permutation(permutation_rng, global_size), offset, local)
    mixed_inputs = lam[:, None, None, None] * inputs + (1 - lam[:, None, None, None]) * all_inputs[partners]
    return MixedBatch(mixed_inputs, all_targets[partners], lam, all_lam.mean())


def bce_with_logits(logits: jax.Array, targets: jax.Array, pos_weight: float) -> jax.Array:
    """Elementwise -(w·y·log σ(z) + (1-y)·log(1-σ(z))): PyTorch's BCEWithLogitsLoss(pos_weight=w) before its
    reduction. w > 1 trades precision for recall: the best constant prediction of a tag has w times its odds."""
    return -(pos_weight * targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))


def training_loss(
    logits: jax.Array,
    targets: jax.Array,
    mixed: MixedBatch | None,
    *,
    pos_weight: float,
    mixup_reduction: str,
) -> jax.Array:
    """This device's loss, a mean over its examples and tags (devices hold equal shares, so the mean over devices
    is the global batch's).

    Without mixup: BCE(z, y). With mixup, "batch_mean" is the authors' criterion: their mixup loss reduces each
    target's BCE to its batch mean first, so the two are weighed by the global batch's mean λ:
    λ̄·BCE(z, y) + (1-λ̄)·BCE(z, y_partner). "per_example" weighs each example's BCE by its own λ_i (with w = 1, the
    BCE of the mixed target).
    """
    own = bce_with_logits(logits, targets, pos_weight)
    if mixed is None:
        return own.mean()
    partner = bce_with_logits(logits, mixed.partner_targets, pos_weight)
    if mixup_reduction == "batch_mean":
        return mixed.mean_lam * own.mean() + (1.0 - mixed.mean_lam) * partner.mean()
    if mixup_reduction == "per_example":
        lam = mixed.lam[:, None]
        return (lam * own + (1.0 - lam) * partner).mean()
    raise ValueError(f"loss.mixup_reduction must be one of {MIXUP_REDUCTIONS}, not {mixup_reduction!r}")
