"""A drop-in `lax.conv_general_dilated` whose gradients are matrix products on CPU (docs/architecture.md,
"Models").

XLA:CPU computes a convolution's kernel gradient with a slow generic loop: on CP-ResNet's convs it took 4-5x the
forward pass for a 3x3 kernel and 8x for a 1x1 (benchmarks/RESULTS.md), and no XLA flag changes that. On CPU,
`conv_general_dilated` below therefore computes, with the same results:

- a 1x1 convolution (stride 1, no padding) forward and input gradient as matrix products over the channels,
  which is also twice as fast as XLA:CPU's 1x1 convolution forward;
- any other convolution forward, and its input gradient, with XLA's own convolutions (as fast as PyTorch's);
- the kernel gradient of every stride-1 convolution, 1x1 included, as matrix products over blocks of rows,
  dW[i, j] = sum over blocks of X_(i,j)^T G, X_(i,j) being the padded input shifted by the tap (a contiguous run
  of its flattened rows), the taps of a block side by side in one product; for a strided conv (the 5x5 stem,
  whose input has one channel) one product of the input patches (im2col) with G.

On every other platform (GPU, TPU) `jax.lax.platform_dependent` keeps XLA's own convolution and its gradients.
Only what the CP-ResNet family uses takes the CPU path, 2-D NHWC x HWIO convolutions without dilation or groups;
anything else goes to `lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]
NHWC = ("NHWC", "HWIO", "NHWC")
# Rows of the output gradient per block of the stride-1 kernel gradient: 256-1,536 measured within 10 % on the
# paper's largest conv (benchmarks/RESULTS.md).
BLOCK_ROWS = 1024


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """`lax.conv_general_dilated` with the same arguments and results; fast gradients on CPU (module docstring)."""
    xla = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    undilated = all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if not (
        undilated
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and _is_nhwc(lhs, rhs, dimension_numbers)
    ):
        return xla(lhs, rhs)
    strides = (int(window_strides[0]), int(window_strides[1]))
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    (top, bottom), (left, right) = padding
    pads = ((int(top), int(bottom)), (int(left), int(right)))
    return lax.platform_dependent(lhs, rhs, cpu=lambda x, w: _conv(x, w, strides, pads, precision), default=xla)


def _is_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers) -> bool:
    if lhs.ndim != 4 or rhs.ndim != 4:
        return False
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, NHWC
    )


def _is_pointwise(w: jax.Array, strides: tuple[int, int], padding: Padding) -> bool:
    return w.shape[:2] == (1, 1) and strides == (1, 1) and padding == ((0, 0), (0, 0))


def _forward(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding, precision) -> jax.Array:
    if _is_pointwise(w, strides, padding):
        return lax.dot_general(x, w[0, 0], (((3,), (0,)), ((), ())), precision=precision)
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding, precision) -> jax.Array:
    """An NHWC x HWIO convolution (explicit padding, no dilation) computed the fast way for XLA:CPU."""
    return _forward(x, w, strides, padding, precision)


def _conv_forward(x, w, strides, padding, precision):
    return _forward(x, w, strides, padding, precision), (x, w)


def _conv_backward(strides, padding, precision, residuals, g):
    x, w = residuals
    if _is_pointwise(w, strides, padding):
        input_gradient = lax.dot_general(g, w[0, 0], (((3,), (1,)), ((), ())), precision=precision)
    else:
        transpose = jax.linear_transpose(lambda lhs: _forward(lhs, w, strides, padding, precision), x)
        input_gradient = transpose(g)[0]
    return input_gradient, kernel_gradient(x, g, w.shape, strides, padding, precision)


_conv.defvjp(_conv_forward, _conv_backward)


def kernel_gradient(
    x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], strides: tuple[int, int], padding: Padding, precision=None
) -> jax.Array:
    """dL/dW (HWIO) of y = conv(x, W) for the output gradient g (NHWC), as matrix products (module docstring)."""
    kh, kw, c, o = kernel_shape
    (top, bottom), (left, right) = padding
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    n, hp, wp, _ = xp.shape
    _, ho, wo, _ = g.shape
    if strides == (1, 1):
        return _blocked_kernel_gradient(xp, g, kh, kw, precision).reshape(kh, kw, c, o).astype(x.dtype)
    # (batch, ho, wo, kh*kw, c) patches: memory kh*kw times the input's, cheap for the one-channel stem.
    sh, sw = strides
    patches = jnp.stack(
        [
            lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
            for i in range(kh)
            for j in range(kw)
        ],
        axis=3,
    )
    return _dot(patches, g, 3, precision).reshape(kh, kw, c, o).astype(x.dtype)


def _blocked_kernel_gradient(xp: jax.Array, g: jax.Array, kh: int, kw: int, precision) -> jax.Array:
    """(kh*kw*c, o) float32 kernel gradient of a stride-1 conv on the padded input xp, in blocks of rows.

    Row r = (b, h, w) of the padded grid: tap (i, j) pairs xp's row r + i*wp + j with g's row r, g being padded with
    zeros to the padded grid so that the rows a tap reads past a row's end meet zeros. Each block of `BLOCK_ROWS`
    rows of g meets the block's rows of xp and the (kh-1)*wp + kw-1 after them (its halo): the kh*kw shifted views
    of that small, cache-resident slice side by side are one matrix product with the block of g. The whole-array
    alternative, one product per tap, copies the input once per tap and was 1.4-1.5x slower (benchmarks/RESULTS.md).
    """
    n, hp, wp, c = xp.shape
    _, ho, wo, o = g.shape
    rows = n * hp * wp
    block = min(BLOCK_ROWS, rows)
    num_blocks = -(-rows // block)
    halo = (kh - 1) * wp + kw - 1
    g_rows = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (0, hp - ho, 0), (0, wp - wo, 0), (0, 0, 0)))
    g_rows = jnp.pad(g_rows.reshape(rows, o), ((0, num_blocks * block - rows), (0, 0)))
    x_rows = jnp.pad(xp.reshape(rows, c), ((0, num_blocks * block - rows + halo), (0, 0)))

    def add_block(index, total):
        x_block = lax.dynamic_slice_in_dim(x_rows, index * block, block + halo)
        taps = [lax.slice_in_dim(x_block, i * wp + j, i * wp + j + block) for i in range(kh) for j in range(kw)]
        patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=1)
        return total + _dot(patches, lax.dynamic_slice_in_dim(g_rows, index * block, block), 1, precision)

    return lax.fori_loop(0, num_blocks, add_block, jnp.zeros((kh * kw * c, o), jnp.float32))


def _dot(a: jax.Array, b: jax.Array, batch_axes: int, precision) -> jax.Array:
    """Sum over the leading `batch_axes` axes of a_(...)ᵀ b_(...), accumulated in float32 (for bfloat16 too)."""
    axes = tuple(range(batch_axes))
    return lax.dot_general(a, b, ((axes, axes), ((), ())), precision=precision, preferred_element_type=jnp.float32)
