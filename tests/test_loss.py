"""The training objective against the authors' criterion written out in PyTorch, and what its positive weight does
to the probabilities (docs/fidelity.md, "Training")."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import faresnet
from emorf_jax import losses, train

BATCH, TAGS = 12, 56


def _problem(seed: int = 0):
    """Logits, 0/1 targets, a permutation of the batch and per-example λ ≥ 0.5, as mixup draws them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(BATCH, TAGS)).astype(np.float32)
    targets = (rng.random((BATCH, TAGS)) < 0.1).astype(np.float32)
    permutation = rng.permutation(BATCH)
    lam = rng.beta(0.3, 0.3, BATCH)
    return logits, targets, permutation, np.maximum(lam, 1 - lam).astype(np.float32)


def _authors_mixup_criterion(logits, targets, permutation, lam, pos_weight):
    """The authors' `criterion_mixup_upweight`, written out: `BCEWithLogitsLoss(pos_weight)` with its default mean
    reduction, applied to both targets, the two scalars weighed by each example's λ and then averaged. Returns the
    loss and its gradient with respect to the logits."""
    output = torch.tensor(logits, requires_grad=True)
    criterion = torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((TAGS,), float(pos_weight)))
    target1, target2 = torch.tensor(targets), torch.tensor(targets[permutation])
    lmpas = torch.tensor(lam)
    loss1, loss2 = criterion(output, target1), criterion(output, target2)
    loss = (loss1 * lmpas + loss2 * (1 - lmpas)).mean()
    loss.backward()
    return loss.item(), output.grad.numpy()


def _ours(logits, targets, permutation, lam, *, pos_weight, mixup_reduction):
    mixed = losses.MixedBatch(
        inputs=jnp.zeros((BATCH, 1, 1, 1)),  # the loss does not read the mixed inputs
        partner_targets=jnp.asarray(targets[permutation]),
        lam=jnp.asarray(lam),
        mean_lam=jnp.asarray(lam.mean()),
    )

    def loss(z):
        return losses.training_loss(
            z, jnp.asarray(targets), mixed, pos_weight=pos_weight, mixup_reduction=mixup_reduction
        )

    value, gradient = jax.value_and_grad(loss)(jnp.asarray(logits))
    return float(value), np.asarray(gradient)


@pytest.mark.parametrize("pos_weight", [10.0, 1.0])
def test_batch_mean_mixup_loss_and_gradient_equal_the_authors_criterion(pos_weight):
    problem = _problem()
    expected_loss, expected_gradient = _authors_mixup_criterion(*problem, pos_weight)
    loss, gradient = _ours(*problem, pos_weight=pos_weight, mixup_reduction="batch_mean")
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-5, atol=1e-9)


def test_the_weighting_changes_the_loss_so_the_parity_test_can_fail():
    """The per-example form and plain BCE are not the authors' criterion on the same problem."""
    problem = _problem(seed=1)
    authors, _ = _authors_mixup_criterion(*problem, 10.0)
    per_example, _ = _ours(*problem, pos_weight=10.0, mixup_reduction="per_example")
    plain, _ = _ours(*problem, pos_weight=1.0, mixup_reduction="batch_mean")
    assert abs(per_example - authors) > 1e-3 * authors
    assert abs(plain - authors) > 0.1 * authors


def test_per_example_mixup_with_no_weight_is_bce_of_the_mixed_target():
    logits, targets, permutation, lam = _problem(seed=2)
    mixed_targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[permutation]
    expected = optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(mixed_targets)).mean()
    loss, _ = _ours(logits, targets, permutation, lam, pos_weight=1.0, mixup_reduction="per_example")
    np.testing.assert_allclose(loss, float(expected), rtol=1e-5)


def test_without_mixup_the_loss_is_pytorchs_weighted_bce():
    logits, targets, _, _ = _problem(seed=3)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.full((TAGS,), 10.0))(
        torch.tensor(logits), torch.tensor(targets)
    )
    loss = losses.training_loss(
        jnp.asarray(logits), jnp.asarray(targets), None, pos_weight=10.0, mixup_reduction="batch_mean"
    )
    np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)


@pytest.mark.parametrize("pos_weight", [1.0, 10.0])
def test_the_best_constant_prediction_has_pos_weight_times_the_odds_of_the_positive_rate(pos_weight):
    """Why the FA runs' mean probability is 5-6 times the positive rate: the loss's optimum moves the odds of every
    tag by the factor `pos_weight` (the odds ratio that `metrics.calibration` measures)."""
    rate = 0.04
    targets = jnp.asarray((np.arange(1000) < rate * 1000).astype(np.float32))

    def loss(z):
        return losses.bce_with_logits(jnp.full(targets.shape, z), targets, pos_weight).mean()

    z = 0.0
    for _ in range(50):  # Newton's method on a convex function of one variable
        z -= float(jax.grad(loss)(z) / jax.grad(jax.grad(loss))(z))
    odds = float(np.exp(z))
    assert odds / (rate / (1 - rate)) == pytest.approx(pos_weight, rel=1e-4)


def test_the_cp_resnet_family_takes_the_authors_loss_and_the_baselines_plain_bce():
    def config(name):
        return importlib.import_module(f"configs.{name}").get_config()

    for name in ("default", "cp_resnet", "faresnet", "shake_faresnet"):
        loss = config(name).loss
        assert (loss.pos_weight, loss.mixup_reduction) == (10.0, "batch_mean"), name
    for name in ("vggish", "vggish_essentia96", "crnn", "resnet18", "resnet34", "resnet50"):
        assert config(name).loss.pos_weight == 1.0, name


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("mixup_reduction", "mean", "loss.mixup_reduction must be one of"), ("pos_weight", 0.0, "must be positive")],
)
def test_a_wrong_loss_setting_stops_the_run_before_it_starts(field, value, message):
    config = faresnet.get_config("test")
    config.loss[field] = value
    with pytest.raises(ValueError, match=message):
        train.check_config(config)
