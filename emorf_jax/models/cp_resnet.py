"""CP-ResNet, its frequency-aware (FA) variant and Shake-Shake FA-ResNet as Flax Linen modules
(docs/fidelity.md, "Model").

Inputs are NHWC: (batch, frequency, time, channels), row 0 of the frequency axis being the lowest mel bin.
Module names follow the authors' PyTorch names (`in_c`, `stage1_block1`, `feed_forward`) so that importing their
weights is a plain renaming (see torch_import.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emorf_jax.models import conv
from emorf_jax.models.layers import BN_MOMENTUM, batch_norm, check_nhwc, kaiming_fan_in, kaiming_fan_out

STEM_KERNEL = 5
STEM_STRIDE = 2
STEM_PADDING = 1  # on both sides, not "same": 256 mel bins become 127
# The smallest frequency/time size that survives the stem (5x5, stride 2, padding 1) and three 2x2 pools.
MIN_INPUT_SIZE = 17
NUM_STAGES = 3
BLOCKS_PER_STAGE = 4
# (stage, block) after which a 2x2, stride-2 max-pool halves both axes.
POOLED_BLOCKS = frozenset({(1, 1), (1, 2), (1, 4)})
# Stage 1, block 1 is fixed at conv1 3x3 and conv2 1x1; ρ counts the 22 block convs after it.
FIXED_KERNELS = (3, 1)
MAX_RHO = NUM_STAGES * BLOCKS_PER_STAGE * 2 - len(FIXED_KERNELS)
# The authors' FA-ResNet `features_shift`: each block rolls its conv1 input by a whole number of frequency rows drawn
# uniformly from -50..50, once per block and call (docs/fidelity.md, "Model").
MAX_FEATURES_SHIFT = 50


def fixup_conv1_init(num_blocks: int) -> nn.initializers.Initializer:
    """N(0, L^-0.5 * sqrt(2/n)) with n = k*k*out_channels (Flax's conv fan_out) and L the network's number of
    blocks, the same for every block (Fixup's rule and the authors' code: docs/fidelity.md, "Initialisation")."""
    return nn.initializers.variance_scaling(2.0 / num_blocks, "fan_out", "normal")


def conv_function(fast_cpu_conv: bool) -> Callable[..., jax.Array]:
    """The convolution whose gradients are fast on CPU (conv.py), or XLA's own everywhere."""
    return conv.conv_general_dilated if fast_cpu_conv else jax.lax.conv_general_dilated


def conv_layer(fast_cpu_conv: bool) -> Callable[..., nn.Conv]:
    """nn.Conv without bias, with `conv_function(fast_cpu_conv)`; the parameters are the same either way."""
    return functools.partial(nn.Conv, use_bias=False, conv_general_dilated=conv_function(fast_cpu_conv))


def block_names() -> list[tuple[int, int]]:
    """(stage, block) of the 12 basic blocks in network order, both counted from 1."""
    return [(stage, block) for stage in range(1, NUM_STAGES + 1) for block in range(1, BLOCKS_PER_STAGE + 1)]


def _check_rho(rho: int) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, np.integer)) or not 0 <= rho <= MAX_RHO:
        raise ValueError(f"rho must be an integer in 0..{MAX_RHO}, got {rho!r}")


def kernel_schedule(rho: int) -> list[tuple[str, int]]:
    """The 24 block convs in network order as ("stage1.block1.conv1", kernel): conv j (after the fixed first
    block) is 3x3 if j <= ρ, else 1x1. The stem is always 5x5 and the shortcuts and head 1x1."""
    _check_rho(rho)
    schedule = []
    for stage, block in block_names():
        for index in (1, 2):
            name = f"stage{stage}.block{block}.conv{index}"
            j = len(schedule) + 1 - len(FIXED_KERNELS)
            kernel = FIXED_KERNELS[index - 1] if (stage, block) == (1, 1) else (3 if j <= rho else 1)
            schedule.append((name, kernel))
    return schedule


def mask_time(x: jax.Array, frames: jax.Array | None) -> jax.Array:
    """An NHWC map with the columns from `frames[i]` on of example i set to zero (none without `frames`): the zeros
    the next conv would pad a map of `frames[i]` columns with, so that a window padded in time computes what the
    unpadded window computes in its first `frames[i]` columns."""
    if frames is None:
        return x
    valid = jnp.arange(x.shape[2]) < jnp.asarray(frames)[:, None]
    return x * valid[:, None, :, None].astype(x.dtype)


def mean_over_valid(x: jax.Array, frames: jax.Array | None) -> jax.Array:
    """The float32 mean over frequency and time of an NHWC map, over each example's first `frames[i]` columns."""
    x = x.astype(jnp.float32)
    if frames is None:
        return jnp.mean(x, axis=(1, 2))
    return mask_time(x, frames).sum(axis=(1, 2)) / (x.shape[1] * jnp.asarray(frames, jnp.float32))[:, None]


def roll_frequency(x: jax.Array, shift: jax.Array) -> jax.Array:
    """An NHWC map rolled circularly by `shift` rows along frequency (row f moves to f + shift, mod F)."""
    return jnp.roll(x, shift, axis=1)


def block_conv_padding(kernel: int) -> int:
    """The authors' padding of a block conv of a k x k kernel: k // 3, 1 for 3x3 and 0 for 1x1."""
    return kernel // 3


def frequency_channel(x: jax.Array) -> jax.Array:
    """The FA channel for an NHWC map with F rows: 2*f/F - 1 at row f (-1 at the lowest bin), constant in time."""
    num_rows = x.shape[1]
    rows = 2.0 * jnp.arange(num_rows, dtype=jnp.float32) / num_rows - 1.0
    return jnp.broadcast_to(rows[None, :, None, None], (*x.shape[:3], 1)).astype(x.dtype)


class FrequencyAwareConv(nn.Module):
    """The authors' FA conv (x with the FA channel appended, a kernel of C+1 input channels) computed as the conv of
    x with the kernel's first C channels plus the conv of the FA channel with its last (docs/architecture.md,
    "Models"). The values and the parameter are those of nn.Conv on the concatenated input, but the concatenated map
    is never written and the constant channel gets no input gradient: on CPU at the paper's size the concatenations
    took 0.43 s of a 12 s step, and the largest conv's 129-channel input gradient 0.37 s more than a 128-channel
    one (benchmarks/RESULTS.md). The channel is convolved at full batch: a batch-1 conv broadcast over the batch
    would need its gradient summed over the batch, which XLA:CPU did in 2 s."""

    features: int
    kernel_size: int
    padding: int
    kernel_init: nn.initializers.Initializer
    dtype: Any
    fast_cpu_conv: bool

    @nn.compact
    def __call__(self, x: jax.Array, shift: jax.Array | None = None, frames: jax.Array | None = None) -> jax.Array:
        """`shift`: roll x AND its FA channel by that many frequency rows first, as the authors' roll of the
        concatenated map does. `frames`: the FA channel is zero from there on, as x is (`mask_time`)."""
        shape = (self.kernel_size, self.kernel_size, x.shape[-1] + 1, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        channel = mask_time(frequency_channel(x), frames)
        if shift is not None:
            x, channel = roll_frequency(x, shift), roll_frequency(channel, shift)
        x, channel, kernel = nn.dtypes.promote_dtype(x, channel, kernel, dtype=self.dtype)
        convolve = functools.partial(
            conv_function(self.fast_cpu_conv),
            window_strides=(1, 1),
            padding=[(self.padding, self.padding)] * 2,
            dimension_numbers=conv.NHWC,
        )
        return convolve(x, kernel[:, :, :-1]) + convolve(channel, kernel[:, :, -1:])


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """`nn.max_pool(x, (2, 2), strides=(2, 2))` (an odd last row or column is dropped), with the same gradient, to
    the first maximum of each window in row-major order, computed elementwise: the gradient XLA derives from
    nn.max_pool materialises index maps and took 1.6 s of a 12 s CPU step at the paper's size
    (benchmarks/RESULTS.md)."""
    return _pool_windows(x).max(axis=(2, 4))


def _pool_windows(x: jax.Array) -> jax.Array:
    """(batch, rows/2, 2, columns/2, 2, channels): the 2x2 windows of x."""
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)


def _max_pool_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = max_pool_2x2(x)
    return y, (x, y)


def _max_pool_backward(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
    x, y = residuals
    windows = _pool_windows(x)
    taken = jnp.zeros(y.shape, bool)
    rows = []
    for i in (0, 1):
        row = []
        for j in (0, 1):
            first = (windows[:, :, i, :, j] == y) & ~taken if (i, j) != (1, 1) else ~taken
            taken = taken | first
            row.append(jnp.where(first, g, jnp.zeros((), g.dtype)))
        rows.append(jnp.stack(row, axis=3))
    n, h, w, c = x.shape
    gradient = jnp.stack(rows, axis=2).reshape(n, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(gradient, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


def shake_shake(branch1: jax.Array, branch2: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
    """α·b1 + (1-α)·b2 in the forward pass, while gradients flow as for β·b1 + (1-β)·b2 (Gastaldi 2017).

    Written as the β-mix plus a stop-gradient correction, so that no custom VJP is needed.
    """
    backward_mix = beta * branch1 + (1 - beta) * branch2
    forward_mix = alpha * branch1 + (1 - alpha) * branch2
    return backward_mix + jax.lax.stop_gradient(forward_mix - backward_mix)


class BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN (+ FA channel before each conv), shortcut, ReLU; with
    `features_shift`, conv1's input (FA channel included) rolled along frequency by a drawn shift."""

    features: int
    kernels: tuple[int, int]
    num_blocks: int  # L in the fixup initialisation: the network's number of blocks
    frequency_aware: bool
    shake_shake: bool
    bn_axis_name: str | None
    bn_momentum: float
    dtype: Any
    fast_cpu_conv: bool = True  # see CPResNet
    features_shift: bool = False  # see CPResNet

    def _conv(self, features: int, kernel: int, init: nn.initializers.Initializer, name: str) -> nn.Module:
        padding = block_conv_padding(kernel)
        return conv_layer(self.fast_cpu_conv)(
            features, (kernel, kernel), padding=[(padding, padding)] * 2, kernel_init=init, dtype=self.dtype, name=name
        )

    def _block_conv(
        self,
        x: jax.Array,
        kernel: int,
        init: nn.initializers.Initializer,
        name: str,
        frames: jax.Array | None,
        shift: jax.Array | None = None,
    ) -> jax.Array:
        """A branch conv of x (zero from `frames` on: `mask_time`): with the FA channel as its last input when
        frequency-aware, and its whole input rolled by `shift` frequency rows first when one is given."""
        x = mask_time(x, frames)
        if self.frequency_aware:
            padding = block_conv_padding(kernel)
            return FrequencyAwareConv(self.features, kernel, padding, init, self.dtype, self.fast_cpu_conv, name=name)(
                x, shift, frames
            )
        return self._conv(self.features, kernel, init, name)(x if shift is None else roll_frequency(x, shift))

    def _branch(
        self, x: jax.Array, train: bool, prefix: str, shift: jax.Array | None, frames: jax.Array | None
    ) -> jax.Array:
        kernel1, kernel2 = self.kernels
        y = self._block_conv(x, kernel1, fixup_conv1_init(self.num_blocks), f"{prefix}conv1", frames, shift)
        y = nn.relu(batch_norm(self, train, f"{prefix}bn1")(y))
        y = self._block_conv(y, kernel2, nn.initializers.zeros, f"{prefix}conv2", frames)
        return batch_norm(self, train, f"{prefix}bn2")(y)

    def _draw_shift(self) -> jax.Array | None:
        """The block's frequency roll from the rng stream "shift", in training and evaluation alike (the authors'
        roll has no evaluation switch), sown as intermediates "features_shift"; None without `features_shift`."""
        if not self.features_shift:
            return None
        shift = jax.random.randint(self.make_rng("shift"), (), -MAX_FEATURES_SHIFT, MAX_FEATURES_SHIFT + 1)
        self.sow("intermediates", "features_shift", shift)
        return shift

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, frames: jax.Array | None = None) -> jax.Array:
        """`frames`: each example's valid columns (`CPResNet`); the output's later columns are not meaningful."""
        shortcut = x
        if x.shape[-1] != self.features:
            shortcut = self._conv(self.features, 1, kaiming_fan_out, "shortcut_conv")(x)
            shortcut = batch_norm(self, train, "shortcut_bn")(shortcut)
        shift = self._draw_shift()
        if not self.shake_shake:
            return nn.relu(shortcut + self._branch(x, train, "", shift, frames))
        branch1 = self._branch(x, train, "branch1_", shift, frames)
        branch2 = self._branch(x, train, "branch2_", shift, frames)
        if train:
            alpha_key, beta_key = jax.random.split(self.make_rng("shake"))
            per_example = (x.shape[0], 1, 1, 1)
            alpha = jax.random.uniform(alpha_key, per_example, self.dtype)
            beta = jax.random.uniform(beta_key, per_example, self.dtype)
        else:
            alpha = beta = jnp.asarray(0.5, self.dtype)
        return nn.relu(shortcut + shake_shake(branch1, branch2, alpha, beta))


class CPResNet(nn.Module):
    """The receptive-field-regularised ResNet of CP-JKU: `apply(variables, x, train=False)` -> logits (batch, tags).

    Fully convolutional: any frequency and time size of at least `MIN_INPUT_SIZE` works. In training mode with
    `shake_shake`, the α/β of every block come from the rng stream "shake", one pair per example. With
    `features_shift`, every block rolls its conv1 input along frequency by a shift from the rng stream "shift"
    (`BasicBlock`), in evaluation too, so `apply` then needs that stream in both modes. The head map (before global
    pooling) is sown as intermediates["feature_map"], and the last block's output
    averaged over frequency and time, what the 1x1 head reads (4 x `base_channels` values), as
    intermediates["embedding"]; the logits are the head's affine map of it.

    `frames` (batch,): a batch of windows zero-padded in time, example i holding `frames[i]` real frames (at least
    `MIN_INPUT_SIZE`). Every conv's input is zeroed from the columns those frames reach on (`mask_time`) and the
    global pooling averages the valid columns only, so a window gives the outputs of its unpadded self (up to float
    rounding) in the padded batch's shape: clips of any length below a window then share one compiled program.
    """

    num_classes: int
    rho: int = 5
    base_channels: int = 128
    frequency_aware: bool = False
    shake_shake: bool = False
    bn_axis_name: str | None = None  # axis of a pmap/shard_map for batch statistics synchronised across devices
    bn_momentum: float = BN_MOMENTUM  # Flax convention; 0.0 makes the running statistics this batch's statistics
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32 and logits are returned as float32
    fast_cpu_conv: bool = True  # on CPU, conv gradients as matrix products (conv.py); False: XLA's own convs
    features_shift: bool = False  # the authors' FA-ResNet option: a random frequency roll in every block

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, frames: jax.Array | None = None) -> jax.Array:
        check_input(x)
        x = mask_time(x.astype(self.dtype), frames)
        pad = [(STEM_PADDING, STEM_PADDING)] * 2
        make_conv = conv_layer(self.fast_cpu_conv)
        x = make_conv(
            self.base_channels,
            (STEM_KERNEL,) * 2,
            strides=STEM_STRIDE,
            padding=pad,
            kernel_init=kaiming_fan_in,
            dtype=self.dtype,
            name="in_c_conv",
        )(x)
        x = nn.relu(batch_norm(self, train, "in_c_bn")(x))
        if frames is not None:  # the stem's output columns that read the valid frames only (or its own padding)
            frames = (jnp.asarray(frames) + 2 * STEM_PADDING - STEM_KERNEL) // STEM_STRIDE + 1

        kernels = dict(kernel_schedule(self.rho))
        blocks = block_names()
        for stage, block in blocks:
            prefix = f"stage{stage}.block{block}"
            x = BasicBlock(
                features=self.base_channels * 2 ** (stage - 1),
                kernels=(kernels[f"{prefix}.conv1"], kernels[f"{prefix}.conv2"]),
                num_blocks=len(blocks),
                frequency_aware=self.frequency_aware,
                shake_shake=self.shake_shake,
                bn_axis_name=self.bn_axis_name,
                bn_momentum=self.bn_momentum,
                dtype=self.dtype,
                fast_cpu_conv=self.fast_cpu_conv,
                features_shift=self.features_shift,
                name=f"stage{stage}_block{block}",
            )(x, train, frames)
            if (stage, block) in POOLED_BLOCKS:
                x = max_pool_2x2(x)
                frames = None if frames is None else frames // 2
        self.sow("intermediates", "embedding", mean_over_valid(x, frames))

        x = make_conv(
            self.num_classes, (1, 1), kernel_init=nn.initializers.zeros, dtype=self.dtype, name="feed_forward_conv"
        )(x)
        x = batch_norm(self, train, "feed_forward_bn")(x)
        self.sow("intermediates", "feature_map", x)
        return mean_over_valid(x, frames)


def check_input(x: jax.Array) -> None:
    """Reject inputs the network cannot take, naming the offending axis, instead of failing deep inside."""
    check_nhwc(x, "CPResNet")
    for axis, name in ((1, "frequency"), (2, "time")):
        if x.shape[axis] < MIN_INPUT_SIZE:
            raise ValueError(
                f"CPResNet input {name} size {x.shape[axis]} (axis {axis} of {x.shape}) is below the "
                f"minimum {MIN_INPUT_SIZE}"
            )
