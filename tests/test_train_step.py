"""The pmapped train step on real forced CPU devices: device-count invariance, SWA, mixup, schedules."""

import functools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils

from configs import faresnet
from data_prep import features
from emorf_jax import losses, split_predictions, train, weight_averaging, windowing
from tests.process_output import stderr_excerpt

REPO = Path(__file__).resolve().parents[1]

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
_SWA = weight_averaging.AveragingSchedule("swa", swa_steps=(2, 4, 6))
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
def two_device_run():
    assert jax.device_count() >= 2, "conftest forces 2 CPU devices"
    return _run_steps(2)


def _float64_history(num_devices: int) -> list[tuple]:
    """(params, batch_stats, opt_state) first and after each of `_STEPS` pmapped steps on `num_devices`, the model
    computing in float64; in a process with jax_enable_x64, else the arrays stay float32."""
    model, initial = _model_and_state(_TX)

    def as_float64(x):
        return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x

    devices = jax.devices()[:num_devices]
    step = _pmapped_step(model.clone(dtype=jnp.float64), devices, mixup_alpha=0.3)
    state = jax_utils.replicate(jax.tree.map(as_float64, initial), devices=devices)
    rng = jax_utils.replicate(jax.random.PRNGKey(3), devices=devices)
    history = [jax.device_get(jax.tree.map(as_float64, (initial.params, initial.batch_stats, initial.opt_state)))]
    for i in range(_STEPS):
        batch = {
            k: v.reshape((num_devices, GLOBAL_BATCH // num_devices) + v.shape[1:])
            for k, v in _batch(seed=10 + i).items()
        }
        state, _ = step(state, batch, rng)
        history.append(_first_replica((state.params, state.batch_stats, state.opt_state)))
    return history


_FLOAT64_HISTORIES = """
import pickle, sys
from tests.test_train_step import _float64_history
with open(sys.argv[1], "wb") as f:
    pickle.dump([_float64_history(1), _float64_history(2)], f)
"""


def test_two_devices_train_as_one_over_every_step_in_float64(tmp_path):
    """One device and two (gradients and BatchNorm statistics all-reduced, mixup over the global batch) give the
    same parameters, statistics and optimiser state after every one of 7 steps with mixup on, within 1e-3.

    In float32 the runs part by rounding alone (1e-6 after step 1, 0.2 after step 7, chaotic through 12 BatchNorms
    on such tiny maps), as far as a wrong all-reduce would take them; in float64 (a child process with
    jax_enable_x64) only the model's float32 pooling rounds: measured 1e-8 after step 1 and 5e-5 after step 7,
    while a single step whose gradients are not all-reduced puts more than 4e-3 between them (step 2 or step 7).
    """
    histories = tmp_path / "histories.pkl"
    result = subprocess.run(
        [sys.executable, "-c", _FLOAT64_HISTORIES, str(histories)],
        cwd=REPO,
        env=dict(os.environ, JAX_ENABLE_X64="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, stderr_excerpt(result.stderr)
    with histories.open("rb") as f:
        one, two = pickle.load(f)
    assert len(one) == len(two) == _STEPS + 1
    assert jax.tree.leaves(one[-1][0])[0].dtype == np.float64
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one[-1][0], one[0][0]))
    assert min(moved) > 0, "every parameter must have been updated"
    for step in range(1, _STEPS + 1):
        jax.tree.map(
            functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-3, err_msg=f"after step {step}"),
            one[step],
            two[step],
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


SPLIT0_STEPS_PER_EPOCH = 9949 / 10  # split-0's training tracks at the paper's batch of 10


@pytest.mark.parametrize(
    "variant, averaged, snapshots",
    [
        (None, 26, 16),  # SWA at epochs 125, 128, ..., 200; snapshots 125, 130, ..., 200
        ("dcase", 51, 29),  # SWA 250, 253, ..., 400; snapshots 256, 261, ..., 396 (their epoch > 250, % 5 == 0)
        ("test", 3, 3),  # both at 1, 1.5, 2
    ],
)
def test_swa_and_snapshots_take_the_authors_count_of_epochs_at_split0s_fractional_epoch(variant, averaged, snapshots):
    """The authors' rule (every `every` epochs from the start to the last epoch, both included) at 994.9 steps per
    epoch, SWA counted by the train step's own test of a due update: an interval rounded to whole steps would drift
    and lose the last update; each lands on the step that ends its epoch, the last SWA update on the last step."""
    config = faresnet.get_config(variant)
    total = train.epochs_to_steps(config.num_epochs, SPLIT0_STEPS_PER_EPOCH)
    schedule = train.averaging_schedule(config, SPLIT0_STEPS_PER_EPOCH)
    no_average = jnp.zeros((), jnp.int32)
    taken_in = jax.jit(jax.vmap(lambda step: weight_averaging.update_average(0.0, 1.0, no_average, step, schedule)[1]))(
        jnp.arange(1, total + 1, dtype=jnp.int32)
    )
    swa_steps = (np.flatnonzero(np.asarray(taken_in)) + 1).tolist()
    start, every = config.weight_average.start_epoch, config.weight_average.every_epochs
    assert len(swa_steps) == averaged
    assert swa_steps == [train.epochs_to_steps(start + k * every, SPLIT0_STEPS_PER_EPOCH) for k in range(averaged)]
    assert swa_steps[-1] == total
    snapshot_steps = train.snapshot_steps(config, SPLIT0_STEPS_PER_EPOCH, total)
    start, every = config.snapshots.start_epoch, config.snapshots.every_epochs
    assert len(snapshot_steps) == snapshots
    assert snapshot_steps == [
        train.epochs_to_steps(start + k * every, SPLIT0_STEPS_PER_EPOCH) for k in range(snapshots)
    ]


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


def _on_two_devices(batch: dict) -> dict:
    return {k: v.reshape((2, GLOBAL_BATCH // 2) + v.shape[1:]) for k, v in batch.items()}


def _reestimated(fields: dict, batches: list[dict], rng: jax.Array, per_batch: list | None = None):
    """The run's BatchNorm re-estimation (`train.batch_stats_step` pmapped over two devices, BatchNorm momentum 0)
    of the perturbed tiny model's weights on `batches`; each batch's own statistics are appended to `per_batch`."""
    model, state = _model_and_state(_TX, fields=fields)
    devices = jax.devices()[:2]
    step = jax.pmap(
        functools.partial(train.batch_stats_step, model=model.clone(bn_momentum=0.0), normalisation=NORMALISATION),
        axis_name="batch",
        devices=devices,
        in_axes=(0, 0, 0, None),
    )
    replicated = jax_utils.replicate(state, devices=devices)

    def batch_stats(params, batch, key):
        stats = step(params, replicated.batch_stats, batch, key)
        if per_batch is not None:
            per_batch.append(_first_replica(stats))
        return stats

    stats = weight_averaging.reestimate_batch_stats(batch_stats, replicated.params, iter(batches), len(batches), rng)
    return _first_replica(stats)


# What the re-estimation gives this model on `_batch(20)` and `_batch(21)` with one fixed key for every batch: a
# model without the frequency roll or Shake-Shake draws nothing random, so the key stream must leave them as they are.
_STATISTICS_WITHOUT_RANDOM_LAYERS = {
    ("in_c_bn", "var"): [2.9540138244628906, 2.1673336029052734, 2.7638497352600098],
    ("stage2_block1", "shortcut_bn", "mean"): [2.1052396297454834, 8.80502700805664, 0.8935260772705078],
    ("stage3_block4", "bn1", "var"): [3.986057996749878, 0.5268425941467285, 0.45808497071266174],
    ("feed_forward_bn", "mean"): [-0.3839859664440155, 0.10518922656774521, -0.8445422649383545],
}


def test_batchnorm_reestimation_without_random_layers_is_the_mean_of_its_batches_statistics():
    per_batch = []
    batches = [_on_two_devices(_batch(seed)) for seed in (20, 21)]
    stats = _reestimated(FIELDS, batches, jax.random.PRNGKey(7), per_batch)
    for path, expected in _STATISTICS_WITHOUT_RANDOM_LAYERS.items():
        got = functools.reduce(lambda tree, key: tree[key], path, stats)
        np.testing.assert_allclose(got[:3], expected, rtol=1e-5, atol=1e-6, err_msg=str(path))
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *per_batch)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), stats, mean)
    assert not np.allclose(per_batch[0]["in_c_bn"]["var"], per_batch[1]["in_c_bn"]["var"])


def test_batchnorm_reestimation_with_the_frequency_roll_draws_a_new_roll_for_every_batch():
    """The same data twice: the stem's statistics (before any roll) are equal, a block's differ, as each batch is
    rolled its own way; without the roll every statistic is equal. One seed gives the same statistics again."""
    same_data_twice = [_on_two_devices(_batch(seed=20))] * 2
    rolled_fields = FIELDS | {"features_shift": True}
    reestimated = {}
    for fields, rolls in ((rolled_fields, True), (FIELDS, False)):
        per_batch = []
        reestimated[rolls] = _reestimated(fields, same_data_twice, jax.random.PRNGKey(7), per_batch)
        first, second = per_batch
        np.testing.assert_array_equal(first["in_c_bn"]["mean"], second["in_c_bn"]["mean"])
        blocks_equal = [
            np.array_equal(first[block]["bn1"]["mean"], second[block]["bn1"]["mean"])
            for block in first
            if block.startswith("stage")
        ]
        assert len(blocks_equal) == 12
        assert not any(blocks_equal) if rolls else all(blocks_equal)
    again = _reestimated(rolled_fields, same_data_twice, jax.random.PRNGKey(7))
    jax.tree.map(np.testing.assert_array_equal, again, reestimated[True])
