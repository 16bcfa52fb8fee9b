"""The CPU convolution of models/conv.py: its values and gradients equal XLA's, and only CPU takes it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export, lax

from emorf_jax.models import CPResNet, conv

NHWC = ("NHWC", "HWIO", "NHWC")
# (kernel, stride, padding, input channels) of every conv the CP-ResNet family has: the 5x5 stride-2 stem with
# padding 1 on the mono input; block convs 3x3 with padding 1 and 1x1 (also shortcuts and the head), on C channels
# and on C + the FA channel; and 'SAME', which takes the same path.
FAMILY = [
    (5, 2, ((1, 1), (1, 1)), 1),
    (3, 1, ((1, 1), (1, 1)), 4),
    (3, 1, ((1, 1), (1, 1)), 5),
    (1, 1, ((0, 0), (0, 0)), 4),
    (1, 1, ((0, 0), (0, 0)), 5),
    (3, 1, "SAME", 5),
]


def _value_and_gradients(function, x, w, g):
    y, vjp = jax.vjp(lambda x, w: function(x, w), x, w)
    return (y, *vjp(g))


def _close(ours, reference, rtol):
    """Equal to `rtol` of each value, or of the array's largest value for the few sums that cancel to ~0."""
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol * 0.1 * np.abs(reference).max())


@pytest.mark.parametrize("kernel,stride,padding,in_channels", FAMILY)
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
def test_values_and_both_gradients_equal_xla(kernel, stride, padding, in_channels, dtype, rtol):
    keys = jax.random.split(jax.random.PRNGKey(kernel * 10 + in_channels), 3)
    x = jax.random.normal(keys[0], (3, 13, 18, in_channels), dtype)  # odd and even sizes: the taps' edges
    w = (jax.random.normal(keys[1], (kernel, kernel, in_channels, 6)) / kernel).astype(dtype)
    arguments = dict(window_strides=(stride, stride), padding=padding, dimension_numbers=NHWC)
    reference = functools.partial(lax.conv_general_dilated, **arguments)
    g = jax.random.normal(keys[2], jax.eval_shape(reference, x, w).shape, dtype)
    expected = jax.jit(functools.partial(_value_and_gradients, reference))(x, w, g)
    got = jax.jit(functools.partial(_value_and_gradients, functools.partial(conv.conv_general_dilated, **arguments)))(
        x, w, g
    )
    for name, ours, theirs in zip(("output", "input gradient", "kernel gradient"), got, expected):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        _close(ours, theirs, rtol)


def _gradient_program(kernel: int, stride: int, platform: str) -> str:
    padding = ((kernel // 3,) * 2,) * 2

    def loss(x, w):
        y = conv.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC)
        return jnp.sum(y**2)

    shapes = (
        jax.ShapeDtypeStruct((2, 12, 16, 3), jnp.float32),
        jax.ShapeDtypeStruct((kernel, kernel, 3, 4), jnp.float32),
    )
    return export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=[platform])(*shapes).mlir_module()


@pytest.mark.parametrize("kernel,stride,cpu_convolutions", [(3, 1, 2), (1, 1, 0), (5, 2, 2)])
def test_only_cpu_computes_kernel_gradients_as_matrix_products(kernel, stride, cpu_convolutions):
    """Forward, input gradient and kernel gradient: XLA's three convolutions on GPU and TPU; on CPU the kernel
    gradient (and all of a 1x1 conv) are matrix products."""
    for platform in ("cuda", "tpu"):
        program = _gradient_program(kernel, stride, platform)
        assert program.count("stablehlo.convolution") == 3 and "stablehlo.dot_general" not in program, platform
    program = _gradient_program(kernel, stride, "cpu")
    assert program.count("stablehlo.convolution") == cpu_convolutions and "stablehlo.dot_general" in program


def test_dilated_grouped_and_nchw_convolutions_are_left_to_xla():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 9, 4))
    cases = [
        ((3, 3, 4, 4), {}, True),
        ((3, 3, 4, 4), {"rhs_dilation": (2, 2)}, False),
        ((3, 3, 2, 4), {"feature_group_count": 2}, False),
        ((3, 9, 3, 3), {"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, False),
    ]
    for kernel_shape, extra, fast in cases:
        w = jax.random.normal(jax.random.PRNGKey(1), kernel_shape)
        arguments = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": NHWC, **extra}
        jaxpr = str(jax.make_jaxpr(functools.partial(conv.conv_general_dilated, **arguments))(x, w))
        assert ("platform_index" in jaxpr) == fast, extra
        _close(conv.conv_general_dilated(x, w, **arguments), lax.conv_general_dilated(x, w, **arguments), 1e-5)


def test_whole_fa_resnet_loss_gradient_equals_the_xla_conv_version():
    """The model built the default way against the same model on XLA's convolutions: same parameter tree,
    logits, loss gradient and BatchNorm statistics."""
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 64, 48, 1))
    labels = (jax.random.uniform(jax.random.PRNGKey(1), (4, 5)) < 0.3).astype(jnp.float32)
    fast = CPResNet(num_classes=5, rho=5, base_channels=4, frequency_aware=True)
    xla = fast.clone(fast_cpu_conv=False)
    variables = fast.init(jax.random.PRNGKey(2), x)
    assert jax.tree.structure(variables) == jax.tree.structure(xla.init(jax.random.PRNGKey(2), x))
    leaves, treedef = jax.tree.flatten(variables["params"])  # zero-initialised layers get weights too
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    params = jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

    @functools.partial(jax.jit, static_argnums=0)
    def loss_and_gradient(model, params):
        def loss(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
            )
            return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), (logits, updates)

        return jax.value_and_grad(loss, has_aux=True)(params)

    (loss_fast, aux_fast), grad_fast = loss_and_gradient(fast, params)
    (loss_xla, aux_xla), grad_xla = loss_and_gradient(xla, params)
    np.testing.assert_allclose(loss_fast, loss_xla, rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), aux_fast, aux_xla)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_xla))
    assert scale > 0
    for ours, theirs in zip(jax.tree.leaves(grad_fast), jax.tree.leaves(grad_xla)):
        # Rounding differences grow through 12 BatchNorms on such small maps, so each leaf is compared to 1e-4
        # of its own largest value; some BatchNorm biases have gradients of rounding size only (1e-6 of all).
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(jnp.abs(theirs).max()) + 1e-6 * scale)
