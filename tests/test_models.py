"""CPResNet, FA-ResNet and Shake-Shake FA-ResNet: sizes, shapes, FA channel, frequency roll, Shake-Shake semantics,
initialisation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emorf_jax.models import CPResNet, frequency_channel, receptive_field, registry, shake_shake
from emorf_jax.models.cp_resnet import BasicBlock, FrequencyAwareConv, block_names, max_pool_2x2
from emorf_jax.models.layers import BN_MOMENTUM


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, x, train=False):
    """(logits, head map, updated batch_stats); jitted once per model and shape, shared between tests."""
    logits, state = model.apply(variables, x, train=train, mutable=["intermediates", "batch_stats"])
    return logits, state["intermediates"]["feature_map"][0], state.get("batch_stats")


def random_variables(model, input_shape, seed):
    """Random non-zero weights and running statistics for `model` (fan-in-scaled kernels keep activations tame).

    The fixup init zeroes conv2 and the head, which would hide most behaviour; numpy draws avoid compiling init.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape), train=False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        low, high = {"scale": (0.5, 1.5), "bias": (-0.5, 0.5), "mean": (-0.5, 0.5), "var": (0.5, 2.0)}[name]
        return rng.uniform(low, high, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("frequency_aware, expected", [(False, 3_587_056), (True, 3_600_368)])
def test_parameter_count_of_rho5_with_56_tags(frequency_aware, expected):
    model = CPResNet(num_classes=56, rho=5, frequency_aware=frequency_aware)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 256, 431, 1)), train=False))
    assert _count(shapes["params"]) == expected


def test_shake_shake_doubles_the_residual_branches():
    def count(shake):
        model = CPResNet(num_classes=56, rho=5, frequency_aware=True, shake_shake=shake)
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1)), train=False))
        return _count(shapes["params"])

    shortcuts_stem_head = 5 * 5 * 128 + 2 * 128 + 128 * 256 + 2 * 256 + 256 * 512 + 2 * 512 + 512 * 56 + 2 * 56
    assert count(True) - count(False) == count(False) - shortcuts_stem_head


def _stage_size(size):
    """Frequency/time size after the stem (5x5, stride 2, padding 1) and three floor 2x2 pools."""
    return ((size + 2 - 5) // 2 + 1) // 8


def test_jitted_logits_and_head_map_for_a_full_spectrogram():
    model = CPResNet(num_classes=56, rho=5, base_channels=4, frequency_aware=True)
    variables = random_variables(model, (2, 256, 431, 1), seed=1)
    logits, feature_map, _ = _apply(model, variables, jnp.ones((2, 256, 431, 1)))
    assert logits.shape == (2, 56) and logits.dtype == jnp.float32
    assert feature_map.shape == (2, 15, 26, 56)  # 256 -> 127 -> 63 -> 31 -> 15 bins, 431 -> 215 -> 107 -> 53 -> 26
    np.testing.assert_allclose(logits, feature_map.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


SMALL_MODEL = CPResNet(num_classes=3, rho=2, base_channels=4)


@pytest.mark.parametrize("frequency, time", [(17, 17), (45, 101)])
def test_odd_sizes_pool_by_floor(frequency, time):
    variables = random_variables(SMALL_MODEL, (1, frequency, time, 2), seed=0)
    logits, feature_map, _ = _apply(SMALL_MODEL, variables, jnp.ones((1, frequency, time, 2)))
    assert logits.shape == (1, 3)
    assert feature_map.shape == (1, _stage_size(frequency), _stage_size(time), 3)


def test_bad_inputs_are_named():
    model = SMALL_MODEL
    with pytest.raises(ValueError, match="time size 16 .* below the minimum 17"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 40, 16, 1)))
    with pytest.raises(ValueError, match="frequency size 10"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 40, 1)))
    with pytest.raises(ValueError, match=r"NHWC input .* got shape \(40, 40\)"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((40, 40)))


@pytest.mark.parametrize("rows", [256, 127, 63, 31, 15, 1])
def test_frequency_channel_values(rows):
    channel = np.asarray(frequency_channel(jnp.zeros((2, rows, 5, 3))))
    assert channel.shape == (2, rows, 5, 1)
    expected = 2.0 * np.arange(rows) / rows - 1.0
    np.testing.assert_allclose(channel[1, :, 3, 0], expected, atol=1e-7)
    assert channel[0, 0, 0, 0] == -1.0
    assert np.all(channel == channel[:, :, :1, :])  # constant over time


def _conv_inputs(model, variables, x, transform):
    """(input, output) of every conv (nn.Conv and FrequencyAwareConv) by module path, captured while tracing, under
    `transform` (jit or eval_shape)."""

    def run(variables, x):
        captured = {}

        def interceptor(next_fun, args, kwargs, context):
            output = next_fun(*args, **kwargs)
            if isinstance(context.module, (nn.Conv, FrequencyAwareConv)) and context.method_name == "__call__":
                captured["/".join(context.module.path)] = (args[0], output)
            return output

        with nn.intercept_methods(interceptor):
            model.apply(variables, x, train=False)
        return captured

    return transform(run, variables, x)


def _kernel(variables, path):
    tree = variables["params"]
    for name in path.split("/"):
        tree = tree[name]
    return tree["kernel"]


@pytest.mark.parametrize("frequency_aware", [True, False])
def test_frequency_channel_is_the_last_input_of_both_block_convs_at_every_resolution(frequency_aware):
    """Every block conv's kernel has one input channel more than its input when frequency-aware, and its output is
    the plain conv of the input with the FA channel appended."""
    base = 4
    model = CPResNet(num_classes=5, rho=22, base_channels=base, frequency_aware=frequency_aware)
    variables = random_variables(model, (1, 256, 19, 1), seed=3)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 256, 19, 1)) + 5.0  # stays far from the FA values
    compute = (lambda run, *args: jax.jit(run)(*args)) if frequency_aware else jax.eval_shape  # values only for FA
    captured = _conv_inputs(model, variables, x, compute)
    block_convs = {path: value for path, value in captured.items() if path.split("/")[-1] in ("conv1", "conv2")}
    assert len(block_convs) == 24
    assert {inputs.shape[1] for inputs, _ in block_convs.values()} == {127, 63, 31, 15}
    for path, (inputs, outputs) in block_convs.items():
        width = base * 2 ** (int(path[len("stage")]) - 1)
        previous_width = base if path.startswith("stage1") else width // 2
        plain = previous_width if path.endswith("block1/conv1") else width
        kernel = _kernel(variables, path)
        assert inputs.shape[-1] == plain and kernel.shape[2] == plain + frequency_aware, path
        if frequency_aware:
            rows = inputs.shape[1]
            channel = np.broadcast_to((2.0 * np.arange(rows) / rows - 1.0)[None, :, None, None], (*inputs.shape[:3], 1))
            padding = kernel.shape[0] // 3
            expected = jax.lax.conv_general_dilated(
                np.concatenate([inputs, channel], axis=-1),
                kernel,
                (1, 1),
                [(padding, padding)] * 2,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=jax.lax.Precision.HIGHEST,
            )
            np.testing.assert_allclose(
                outputs, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()), err_msg=path
            )
    assert captured["in_c_conv"][0].shape[-1] == 1
    assert captured["stage2_block1/shortcut_conv"][0].shape[-1] == base
    assert captured["feed_forward_conv"][0].shape[-1] == 4 * base


@pytest.mark.parametrize("kernel,fast_cpu_conv", [(3, True), (1, True), (3, False)])
def test_frequency_aware_conv_equals_a_conv_of_the_concatenated_input_in_values_and_gradients(kernel, fast_cpu_conv):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 13, 10, 4))
    module = FrequencyAwareConv(6, kernel, kernel // 3, nn.initializers.lecun_normal(), jnp.float32, fast_cpu_conv)
    params = module.init(jax.random.PRNGKey(1), x)
    plain = nn.Conv(6, (kernel, kernel), padding=[(kernel // 3,) * 2] * 2, use_bias=False)
    rows = 2.0 * jnp.arange(13) / 13 - 1.0

    def concatenated(x):
        return jnp.concatenate([x, jnp.broadcast_to(rows[None, :, None, None], (*x.shape[:3], 1))], -1)

    plain_params = plain.init(jax.random.PRNGKey(1), concatenated(x))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, plain_params)
    g = jax.random.normal(jax.random.PRNGKey(2), (3, 13, 10, 6))
    ours = jax.vjp(lambda p, x: module.apply(p, x), params, x)
    theirs = jax.vjp(lambda p, x: plain.apply(p, concatenated(x)), params, x)
    for got, expected in zip((ours[0], *ours[1](g)), (theirs[0], *theirs[1](g))):
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), got, expected)


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (2, 8, 10, 3), (1, 31, 53, 2)])
def test_max_pool_equals_flax_max_pool_in_values_and_gradient_with_ties(shape):
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape), jnp.float32)  # many ties, as ReLU zeros make
    reference = functools.partial(nn.max_pool, window_shape=(2, 2), strides=(2, 2), padding="VALID")
    y, vjp = jax.vjp(max_pool_2x2, x)
    expected, expected_vjp = jax.vjp(reference, x)
    g = jnp.asarray(np.random.default_rng(1).normal(size=expected.shape), jnp.float32)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(vjp(g)[0], expected_vjp(g)[0])  # each window's first maximum takes it all


def test_shake_shake_function_forward_alpha_backward_beta():
    branch1, branch2 = jnp.array([1.0, 2.0]), jnp.array([-3.0, 5.0])
    alpha, beta = jnp.array([0.2, 0.7]), jnp.array([0.9, 0.1])
    np.testing.assert_allclose(shake_shake(branch1, branch2, alpha, beta), alpha * branch1 + (1 - alpha) * branch2)
    gradient1, gradient2 = jax.grad(lambda b1, b2: shake_shake(b1, b2, alpha, beta).sum(), argnums=(0, 1))(
        branch1, branch2
    )
    np.testing.assert_allclose(gradient1, beta)
    np.testing.assert_allclose(gradient2, 1 - beta)


def _map_blocks(variables, function):
    """`variables` with `function` applied to every block's subtree, in params and batch_stats."""
    return {
        collection: {module: function(tree) if module.startswith("stage") else tree for module, tree in trees.items()}
        for collection, trees in variables.items()
    }


def _branch2_as_branch1(block):
    return {
        **block,
        **{name.replace("branch1_", "branch2_"): value for name, value in block.items() if name.startswith("branch1_")},
    }


def _branch1_only(block):
    return {name.removeprefix("branch1_"): value for name, value in block.items() if not name.startswith("branch2_")}


SHAKE_MODEL = CPResNet(num_classes=4, rho=3, base_channels=4, frequency_aware=True, shake_shake=True)
TWINS = jnp.repeat(jax.random.normal(jax.random.PRNGKey(0), (1, 33, 33, 1)), 2, axis=0)  # one example, twice


def _shake_variables(identical_branches):
    variables = random_variables(SHAKE_MODEL, TWINS.shape, seed=2)
    return _map_blocks(variables, _branch2_as_branch1) if identical_branches else variables


@functools.partial(jax.jit, static_argnames="train")
def _shake_feature_map(variables, key, train):
    """The head map of SHAKE_MODEL on TWINS."""
    _, state = SHAKE_MODEL.apply(
        variables, TWINS, train=train, rngs={"shake": key}, mutable=["batch_stats", "intermediates"]
    )
    return state["intermediates"]["feature_map"][0]


def test_shake_shake_training_draws_per_example_alpha_from_the_shake_rng():
    variables = _shake_variables(identical_branches=False)
    feature_map = _shake_feature_map(variables, jax.random.PRNGKey(1), train=True)
    assert not np.allclose(feature_map[0], feature_map[1])  # one α per example, though the examples are equal
    np.testing.assert_array_equal(feature_map, _shake_feature_map(variables, jax.random.PRNGKey(1), True))
    assert not np.allclose(feature_map, _shake_feature_map(variables, jax.random.PRNGKey(2), True))
    # α·b + (1-α)·b = b: with identical branches the forward pass cannot depend on α.
    twins = _shake_variables(identical_branches=True)
    np.testing.assert_allclose(
        _shake_feature_map(twins, jax.random.PRNGKey(1), True),
        _shake_feature_map(twins, jax.random.PRNGKey(2), True),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(Exception, match="shake"):
        jax.eval_shape(lambda: SHAKE_MODEL.apply(variables, TWINS, train=True, mutable=["batch_stats"]))


def test_shake_shake_evaluation_is_the_deterministic_mean_of_the_branches():
    variables = _shake_variables(identical_branches=False)
    feature_map = _shake_feature_map(variables, jax.random.PRNGKey(1), train=False)
    np.testing.assert_array_equal(feature_map, _shake_feature_map(variables, jax.random.PRNGKey(9), False))
    # With identical branches, 0.5·b + 0.5·b = b: the plain FA-ResNet with branch 1's weights.
    twins = _shake_variables(identical_branches=True)
    plain = SHAKE_MODEL.clone(shake_shake=False)
    _, state = jax.jit(functools.partial(plain.apply, mutable=["intermediates"]))(
        _map_blocks(twins, _branch1_only), TWINS
    )
    np.testing.assert_allclose(
        _shake_feature_map(twins, jax.random.PRNGKey(1), False),
        state["intermediates"]["feature_map"][0],
        rtol=1e-5,
        atol=1e-5,
    )


ROLL_MODEL = CPResNet(num_classes=3, rho=2, base_channels=2, frequency_aware=True, features_shift=True)
ROLL_INPUT = jax.random.normal(jax.random.PRNGKey(0), (2, 17, 17, 1))


@functools.partial(jax.jit, static_argnames="train")
def _rolls(variables, keys, train):
    """(logits, shifts) per key: the logits (keys, 2, 3) and every block's drawn shift (keys, 12) of ROLL_MODEL."""

    def one(key):
        logits, state = ROLL_MODEL.apply(
            variables, ROLL_INPUT, train=train, rngs={"shift": key}, mutable=["intermediates", "batch_stats"]
        )
        blocks = state["intermediates"]
        return logits, jnp.stack([blocks[f"stage{s}_block{b}"]["features_shift"][0] for s, b in block_names()])

    return jax.vmap(one)(keys)


def test_frequency_roll_draws_every_shift_from_minus_50_to_50_per_block_in_training_and_evaluation():
    variables = random_variables(ROLL_MODEL, ROLL_INPUT.shape, seed=3)
    keys = jax.random.split(jax.random.PRNGKey(1), 200)
    logits, shifts = _rolls(variables, keys, train=False)
    assert set(np.asarray(shifts).ravel().tolist()) == set(range(-50, 51))  # 2,400 draws, each of the 101 values
    assert all(len(set(row)) > 6 for row in np.asarray(shifts).tolist())  # one draw per block, not one per call
    assert not np.allclose(logits[0], logits[1])  # evaluation is random too, as the authors' roll
    np.testing.assert_array_equal(_rolls(variables, keys, train=True)[1], shifts)  # the same draws in training
    with pytest.raises(Exception, match='needs PRNG for "shift"'):
        ROLL_MODEL.apply(variables, ROLL_INPUT, train=False)
    plain = jax.eval_shape(lambda: ROLL_MODEL.clone(features_shift=False).init(jax.random.PRNGKey(0), ROLL_INPUT))
    assert jax.tree.map(lambda leaf: leaf.shape, plain) == jax.tree.map(np.shape, variables)  # same weights


def test_checkpoint_fields_with_and_without_the_roll_build_and_describe_the_model():
    fields = {
        "num_classes": 56,
        "rho": 5,
        "base_channels": 128,
        "frequency_aware": True,
        "shake_shake": False,
        "features_shift": False,
    }
    assert registry.build(fields).features_shift is False
    assert registry.describe(fields) == "FA-ResNet, rho=5, base_channels=128, 56 tags"
    rolled = {**fields, "features_shift": True}
    assert registry.build(rolled).features_shift is True
    assert registry.describe(rolled) == "FA-ResNet with frequency roll, rho=5, base_channels=128, 56 tags"


SHAKE_BLOCK = BasicBlock(
    features=6,
    kernels=(3, 3),
    num_blocks=12,
    frequency_aware=True,
    shake_shake=True,
    bn_axis_name=None,
    bn_momentum=BN_MOMENTUM,
    dtype=jnp.float32,
)


@functools.partial(jax.jit, static_argnames="train")
def _shake_block_gradients(variables, x, key, train):
    """The block's output and the gradient of a fixed projection of it w.r.t. each branch's last BN bias."""

    def projection(params):
        output, _ = SHAKE_BLOCK.apply(
            {**variables, "params": params}, x, train, rngs={"shake": key}, mutable=["batch_stats"]
        )
        return (output * jnp.cos(jnp.arange(output.size)).reshape(output.shape)).sum(), output

    (_, output), gradients = jax.value_and_grad(projection, has_aux=True)(variables["params"])
    return output, gradients["branch1_bn2"]["bias"], gradients["branch2_bn2"]["bias"]


@pytest.mark.parametrize("train", [True, False])
def test_shake_shake_block_gradient_splits_as_beta_in_training_and_half_in_evaluation(train):
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 9, 6))  # one example: one β
    variables = {
        collection: _branch2_as_branch1(tree)
        for collection, tree in random_variables(SHAKE_BLOCK, x.shape, seed=7).items()
    }
    shares = []
    for key in (jax.random.PRNGKey(1), jax.random.PRNGKey(2)):
        _, gradient1, gradient2 = _shake_block_gradients(variables, x, key, train)
        live = np.abs(gradient1 + gradient2) > 1e-4  # channels that ReLU does not silence
        assert live.sum() >= 3
        share = np.asarray(gradient1 / (gradient1 + gradient2))[live]
        np.testing.assert_allclose(share, share[0], rtol=1e-4)  # one β for all channels of the example
        shares.append(share[0])
    if train:
        assert all(0.0 < share < 1.0 for share in shares) and abs(shares[0] - shares[1]) > 1e-3
    else:
        np.testing.assert_allclose(shares, 0.5, rtol=1e-5)


def test_fixup_initialisation():
    model = CPResNet(num_classes=7, rho=5, base_channels=32)
    rbg_key = jax.random.key(0, impl="rbg")  # compiles faster than threefry; the distributions are the same
    variables = jax.jit(functools.partial(model.init, train=False))(rbg_key, jnp.zeros((1, 17, 17, 1)))
    params = variables["params"]
    blocks = receptive_field.block_names()
    assert len(blocks) == 12
    for stage, block_index in blocks:
        module = f"stage{stage}_block{block_index}"
        block = params[module]
        kernel = np.asarray(block["conv1"]["kernel"])
        size, _, _, out = kernel.shape
        # L = 12, the number of blocks, for EVERY block (not the block's own index).
        expected_std = 12**-0.5 * np.sqrt(2.0 / (size * size * out))
        assert abs(kernel.std() / expected_std - 1) < 0.1, (module, kernel.std() / expected_std)
        assert not np.any(np.asarray(block["conv2"]["kernel"])), module
        if "shortcut_conv" in block:
            assert abs(np.asarray(block["shortcut_conv"]["kernel"]).std() / np.sqrt(2.0 / out) - 1) < 0.1, module
    stem = np.asarray(params["in_c_conv"]["kernel"])
    assert abs(stem.std() / np.sqrt(2.0 / 25) - 1) < 0.15  # Kaiming fan-in: 5*5*1 inputs
    widest = np.asarray(params["stage3_block2"]["conv1"]["kernel"])
    assert np.abs(widest).max() > 3.0 * widest.std()  # a plain normal, not PyTorch-unlike truncated
    assert not np.any(np.asarray(params["feed_forward_conv"]["kernel"]))
    for name, leaf in jax.tree_util.tree_leaves_with_path(params):
        path = jax.tree_util.keystr(name)
        if "scale" in path:
            assert np.all(np.asarray(leaf) == 1.0), path
        if "bias" in path:
            assert np.all(np.asarray(leaf) == 0.0), path
    logits, _, _ = _apply(model, variables, jax.random.normal(jax.random.PRNGKey(0), (2, 17, 17, 1)))
    np.testing.assert_array_equal(logits, 0.0)  # zero head conv, BN bias 0


SYNC_MODEL = CPResNet(num_classes=3, rho=2, base_channels=4, frequency_aware=True, bn_momentum=0.0)
SYNC_INPUT = jax.random.normal(jax.random.PRNGKey(1), (4, 24, 24, 1)) * 3.0 + 1.0


def test_zero_batch_norm_momentum_keeps_only_this_batch_statistics():
    variables = random_variables(SYNC_MODEL, SYNC_INPUT.shape, seed=5)
    _, _, batch_stats = _apply(SYNC_MODEL, variables, SYNC_INPUT, train=True)
    stem_output = jax.lax.conv_general_dilated(
        SYNC_INPUT,
        variables["params"]["in_c_conv"]["kernel"],
        (2, 2),
        [(1, 1)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(batch_stats["in_c_bn"]["mean"], stem_output.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(batch_stats["in_c_bn"]["var"], stem_output.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-6)


def test_synchronised_batch_norm_makes_two_shards_equal_one_batch():
    variables = random_variables(SYNC_MODEL, SYNC_INPUT.shape, seed=5)
    whole_logits, _, whole_stats = _apply(SYNC_MODEL, variables, SYNC_INPUT, train=True)
    synchronised = SYNC_MODEL.clone(bn_axis_name="devices")
    shard = functools.partial(synchronised.apply, variables, train=True, mutable=["batch_stats"])
    shard_logits, shard_stats = jax.jit(jax.vmap(shard, axis_name="devices"))(SYNC_INPUT.reshape(2, 2, 24, 24, 1))
    # float32 rounding through 12 BatchNorms of batch statistics (6e-4 seen); unsynchronised shards differ by 2.3
    np.testing.assert_allclose(shard_logits.reshape(4, 3), whole_logits, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(
        shard_stats["batch_stats"]["stage3_block4"]["bn2"]["var"][1],
        whole_stats["stage3_block4"]["bn2"]["var"],
        rtol=3e-4,
    )  # float32 rounding


def test_bfloat16_compute_keeps_float32_params_and_logits():
    half_model = SMALL_MODEL.clone(dtype=jnp.bfloat16)
    shapes = jax.eval_shape(lambda: half_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 17, 17, 2)), train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    variables = random_variables(SMALL_MODEL, (1, 17, 17, 2), seed=0)
    x = jnp.ones((1, 17, 17, 2))
    half, half_map, _ = _apply(half_model, variables, x)
    full, _, _ = _apply(SMALL_MODEL, variables, x)  # compiled already by the odd-size test
    assert half.dtype == jnp.float32 and half_map.dtype == jnp.bfloat16
    np.testing.assert_allclose(half, full, rtol=0.05, atol=0.05 * np.abs(full).max())
