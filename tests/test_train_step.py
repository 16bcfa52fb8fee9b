"""The pmapped train step on real forced CPU devices: device-count invariance, SWA, mixup, schedules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils

from configs import faresnet
from data_prep import features
from emorf_jax import losses, split_predictions, train, weight_averaging, windowing

# Large enough that every BatchNorm normalises over many values: tiny maps make its statistics ill-conditioned.
N_MELS, FRAMES, TAGS, GLOBAL_BATCH = 64, 48, 5, 8
FIELDS = {"num_classes": TAGS, "rho": 3, "base_channels": 4, "frequency_aware": True, "shake_shake": False}


def _model_and_state(tx: optax.GradientTransformation, seed: int = 0, fields: dict = FIELDS):
    """A tiny FA-ResNet whose zero-initialised layers are perturbed, so that every layer gets gradients."""
    model = train.create_model(fields, axis_name="batch")
    state = train.initial_state(model.clone(bn_axis_name=None), tx, jax.random.PRNGKey(seed), (1, N_MELS, FRAMES, 1))
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    params = jax.tree.unflatten(
        treedef, [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    )
    return model, state.replace(params=params, opt_state=tx.init(params), average_params=params)


# The per-band (mean, std) with which the steps normalise the stored-format batches of `_batch`.
NORMALISATION = (np.linspace(-1, 1, N_MELS, dtype=np.float32), np.linspace(2, 3, N_MELS, dtype=np.float32))


def _batch(seed: int):
    """Stored-format crops (time-major float16), as the input pipeline makes them, and labels."""
    rng = np.random.default_rng(seed)
    mean, std = NORMALISATION
    stored = rng.normal(size=(GLOBAL_BATCH, FRAMES, N_MELS)) * std + mean
    return {
        "spectrogram": stored.astype(np.float16),
        "labels": (rng.random((GLOBAL_BATCH, TAGS)) < 0.4).astype(np.float32),
    }


def _first_replica(tree):
    return jax.tree.map(lambda x: np.asarray(x)[0], tree)


# SGD, not Adam: Adam's first steps divide by |gradient| and so magnify float rounding in near-zero gradients.
_TX = optax.sgd(0.02)
_SWA = weight_averaging.AveragingSchedule("swa", start_step=2, every_steps=2)
_STEPS = 7


def _pmapped_step(model, devices, *, mixup_alpha: float):
    """The train step pmapped over `devices` with the tests' optimiser, SWA schedule, loss and normalisation."""
    return jax.pmap(
        functools.partial(
            train.train_step,
            model=model,
            tx=_TX,
            mixup_alpha=mixup_alpha,
            pos_weight=10.0,
            mixup_reduction="batch_mean",
            averaging=_SWA,
            learning_rate=optax.constant_schedule(0.02),
            normalisation=NORMALISATION,
        ),
        axis_name="batch",
        devices=devices,
    )


def _run_steps(num_devices: int):
    """(initial state, final state, state after every step) of `_STEPS` pmapped steps on `num_devices`."""
    model, initial = _model_and_state(_TX)
    devices = jax.devices()[:num_devices]
    step = _pmapped_step(model, devices, mixup_alpha=0.3)
    state = jax_utils.replicate(initial, devices=devices)
    rng = jax_utils.replicate(jax.random.PRNGKey(3), devices=devices)
    history = []
    for i in range(_STEPS):
        batch = {
            k: v.reshape((num_devices, GLOBAL_BATCH // num_devices) + v.shape[1:])
            for k, v in _batch(seed=10 + i).items()
        }
        state, _ = step(state, batch, rng)
        history.append(_first_replica(state))
    return initial, _first_replica(state), history


@pytest.fixture(scope="module")
def one_device_run():
    return _run_steps(1)


@pytest.fixture(scope="module")
def two_device_run():
    assert jax.device_count() >= 2, "conftest forces 2 CPU devices"
    return _run_steps(2)


def test_two_devices_give_the_same_step_as_one_with_mixup_on(one_device_run, two_device_run):
    initial, one, one_history = one_device_run
    _, two, two_history = two_device_run
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one.params, initial.params))
    assert min(moved) > 0, "every parameter must have been updated"
    # One step: equal to float precision (parameters, synchronised BatchNorm statistics, optimiser state).
    # (Over many steps rounding differences grow chaotically through 12 BatchNorms on such tiny maps.)
    for name in ("params", "batch_stats", "opt_state"):
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
            getattr(one_history[0], name),
            getattr(two_history[0], name),
        )


def test_swa_equals_the_mean_of_the_weights_it_averaged(two_device_run):
    _, state, history = two_device_run
    averaged = [history[s - 1].params for s in (2, 4, 6)]  # after steps 2, 4 and 6
    expected = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *averaged)
    assert int(state.average_count) == 3
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), state.average_params, expected)
    # It really is an average: it differs from the last weights.
    assert not np.allclose(jax.tree.leaves(state.average_params)[0], jax.tree.leaves(history[-1].params)[0])


def test_ema_follows_its_decay():
    schedule = weight_averaging.AveragingSchedule("ema", start_step=2, ema_decay=0.75)
    weights = [np.full(3, float(i)) for i in range(1, 6)]
    average, count = np.zeros(3), jnp.zeros((), jnp.int32)
    for step, w in enumerate(weights, start=1):
        average, count = weight_averaging.update_average(average, w, count, jnp.int32(step), schedule)
    expected = weights[1]  # the first update (step 2) copies
    for w in weights[2:]:
        expected = 0.75 * expected + 0.25 * w
    np.testing.assert_allclose(average, expected, rtol=1e-6)
    assert int(count) == 4


def test_mixup_mixes_each_input_with_the_partner_whose_targets_it_returns():
    inputs = jnp.arange(8, dtype=jnp.float32).reshape(8, 1, 1, 1) * jnp.ones((8, 2, 3, 1))
    targets = jnp.eye(8)  # one-hot: each partner's targets name it
    mixed = losses.mixup(jax.random.PRNGKey(0), inputs, targets, alpha=0.3)
    lam, partners = np.asarray(mixed.lam), np.argmax(np.asarray(mixed.partner_targets), axis=1)
    assert np.all(lam >= 0.5) and np.all(lam <= 1.0) and len(set(lam.tolist())) > 1
    assert sorted(partners.tolist()) == list(range(8))  # a permutation
    np.testing.assert_allclose(
        np.asarray(mixed.inputs)[:, 0, 0, 0], lam * np.arange(8) + (1 - lam) * partners, rtol=1e-5
    )
    np.testing.assert_allclose(float(mixed.mean_lam), lam.mean(), rtol=1e-6)


def test_learning_rate_schedule_is_the_authors_per_epoch_rampdown():
    config = faresnet.get_config()
    schedule = train.learning_rate_schedule(config, steps_per_epoch=10.5)
    rate = lambda epoch, within=0: float(schedule(int(np.ceil(epoch * 10.5)) + within))  # noqa: E731
    assert rate(0) == rate(25) == rate(25, within=9) == pytest.approx(1e-4)  # constant while epoch <= 25
    assert rate(26) == pytest.approx(1e-4 * 99 / 100)  # then towards 0 over 100 epochs, one value per epoch
    assert rate(26, within=9) == rate(26)
    assert rate(75) == pytest.approx(1e-4 * 50 / 100)
    assert rate(124) == pytest.approx(1e-4 * 1 / 100)
    assert rate(125) == rate(199) == pytest.approx(1e-6)  # lr/100 from the SWA start (epoch 125) on
    assert config.weight_average.start_epoch == config.lr_decay_end_epoch == 125


def test_snapshot_steps_follow_the_config():
    config = faresnet.get_config()
    steps = train.snapshot_steps(config, steps_per_epoch=9949 / 16, total_steps=train.epochs_to_steps(200, 9949 / 16))
    assert steps[0] == round(125 * 9949 / 16) and steps[1] - steps[0] == round(5 * 9949 / 16)
    assert len(steps) == 16  # epochs 125, 130, ..., 200


def test_bfloat16_compute_steps_like_float32():
    """half_precision (bfloat16 compute, float32 parameters): the pmapped step's loss equals float32's within
    bfloat16's rounding, the parameters it writes stay float32, and the compute is really bfloat16 (the losses are
    not identical). Loss curves over several steps are no test of precision on this tiny net: its training-mode
    gradients, through 12 BatchNorms' batch statistics on 8 examples of 4 channels, move by 25-60 % in relative L2
    when the input moves by 0.1 % in float32 alone (benchmarks/RESULTS.md); the next test compares gradients without
    that amplifier."""
    _, initial = _model_and_state(_TX)
    device = jax.devices()[:1]
    batch = {k: v[None] for k, v in _batch(seed=10).items()}
    rng = jax_utils.replicate(jax.random.PRNGKey(3), devices=device)
    step_losses, finals = {}, {}
    for half_precision in (False, True):
        model = train.create_model(FIELDS, half_precision=half_precision, axis_name="batch")
        step = _pmapped_step(model, device, mixup_alpha=0.0)
        state, step_metrics = step(jax_utils.replicate(initial, devices=device), batch, rng)
        step_losses[half_precision], finals[half_precision] = float(step_metrics["loss"][0]), _first_replica(state)
    assert {leaf.dtype for leaf in jax.tree.leaves(finals[True].params)} == {np.dtype(np.float32)}
    assert step_losses[True] != step_losses[False]
    np.testing.assert_allclose(step_losses[True], step_losses[False], rtol=5e-3)


def _relative_l2(tree, reference) -> float:
    difference = sum(
        float(jnp.sum((a.astype(jnp.float32) - b) ** 2))
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(reference))
    )
    return (difference / sum(float(jnp.sum(b**2)) for b in jax.tree.leaves(reference))) ** 0.5


def test_bfloat16_gradients_equal_float32_within_bfloat16_rounding_with_running_statistics():
    """With BatchNorm on its running statistics, bfloat16 compute's loss gradient is float32's to within 5 % in
    relative L2 (0.67 % measured here); a broken cast (a float16 or bfloat16 parameter, a low-precision sum) fails
    it."""
    _, state = _model_and_state(_TX)
    batch = _batch(seed=11)
    gradients = {}
    for half_precision in (False, True):
        model = train.create_model(FIELDS, half_precision=half_precision)

        def loss(params, model=model):
            inputs = windowing.model_input(batch["spectrogram"], *NORMALISATION)
            logits = model.apply({"params": params, "batch_stats": state.batch_stats}, inputs)
            return optax.sigmoid_binary_cross_entropy(logits, batch["labels"]).mean()

        gradients[half_precision] = jax.jit(jax.grad(loss))(state.params)
    assert {leaf.dtype for leaf in jax.tree.leaves(gradients[True])} == {np.dtype(np.float32)}
    assert 0 < _relative_l2(gradients[True], gradients[False]) < 0.05


def test_the_dcase_variant_saves_snapshots_and_averages_weights_after_the_authors_epochs():
    """The authors' trainer, written out per 0-based epoch e at its end: a snapshot when e > 250 and e % 5 == 0; an
    SWA update when e + 1 >= 250 and (e + 1 - 250) % 3 == 0. One step per epoch makes steps count epochs."""
    config = faresnet.get_config("dcase")
    epochs = range(config.num_epochs)
    assert config.num_epochs == 400 and config.batch_size == 10 and config.eval_every_epochs == 1
    assert features.settings_for(config.dataset.config_name).channels == 2  # the authors' two-channel input
    assert train.snapshot_steps(config, 1.0, config.num_epochs) == [e + 1 for e in epochs if e > 250 and e % 5 == 0]
    swa = train.averaging_schedule(config, 1.0)
    count, updates = jnp.zeros((), jnp.int32), []
    for step in range(1, config.num_epochs + 1):
        _, new_count = weight_averaging.update_average(0.0, 1.0, count, jnp.int32(step), swa)
        if new_count > count:
            updates.append(step)
        count = new_count
    assert updates == [e + 1 for e in epochs if e + 1 >= 250 and (e + 1 - 250) % 3 == 0]


def test_a_model_with_the_frequency_roll_trains_and_scores_a_window_whatever_its_batch():
    model, state = _model_and_state(_TX, fields=FIELDS | {"features_shift": True})
    step = _pmapped_step(model, jax.devices()[:1], mixup_alpha=0.3)
    batch = {k: v[None] for k, v in _batch(seed=12).items()}
    trained, step_metrics = step(
        jax_utils.replicate(state, jax.devices()[:1]),
        batch,
        jax_utils.replicate(jax.random.PRNGKey(0), jax.devices()[:1]),
    )
    assert np.isfinite(float(step_metrics["loss"][0]))
    variables = {"params": _first_replica(trained.params), "batch_stats": _first_replica(trained.batch_stats)}
    scores = functools.partial(split_predictions.logits_step, variables, mean=NORMALISATION[0], std=NORMALISATION[1])
    stored = batch["spectrogram"][0]
    rolled = model.clone(bn_axis_name=None)
    whole, half = scores(stored, model=rolled), scores(stored[:4], model=rolled)
    np.testing.assert_allclose(np.asarray(half), np.asarray(whole)[:4], rtol=1e-5, atol=1e-6)
    unrolled = train.create_model(FIELDS)
    assert not np.allclose(np.asarray(scores(stored, model=unrolled)), np.asarray(whole), atol=1e-3)
