"""Vision ResNets (He et al. 2016, "Deep residual learning for image recognition") on a 1-channel spectrogram: the
"deeper is not better" rows of the paper's table (docs/fidelity.md, "Baselines").

Stem 7x7/2 conv - BN - ReLU - 3x3/2 max-pool; four stages of basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x
expansion) blocks, widths 64, 128, 256, 512, the first block of stages 2-4 striding by 2 (in its 3x3 conv, as in
torchvision), projection shortcuts (1x1 conv + BN) where the shape changes; global average pooling; a dense head.
Every conv is initialised as in torchvision: Kaiming-normal, fan out.
ResNet-18: basic [2, 2, 2, 2]; ResNet-34: basic [3, 4, 6, 3]; ResNet-50: bottleneck [3, 4, 6, 3].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from emorf_jax.models.layers import BN_MOMENTUM, batch_norm, check_nhwc, kaiming_fan_out

STAGE_SIZES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
BOTTLENECK = {"resnet18": False, "resnet34": False, "resnet50": True}
EXPANSION = 4  # output channels of a bottleneck block per its width


class ResidualBlock(nn.Module):
    """A post-activation basic or bottleneck block; `strides` apply in its 3x3 conv."""

    features: int
    strides: int
    bottleneck: bool
    bn_axis_name: str | None
    bn_momentum: float
    dtype: Any

    def _conv(self, features: int, kernel: int, strides: int, name: str) -> nn.Conv:
        pad = kernel // 2
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=strides,
            padding=[(pad, pad)] * 2,
            use_bias=False,
            kernel_init=kaiming_fan_out,
            dtype=self.dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.bottleneck:
            layers = [(self.features, 1, 1), (self.features, 3, self.strides), (self.features * EXPANSION, 1, 1)]
        else:
            layers = [(self.features, 3, self.strides), (self.features, 3, 1)]
        y = x
        for index, (features, kernel, strides) in enumerate(layers, start=1):
            y = batch_norm(self, train, f"bn{index}")(self._conv(features, kernel, strides, f"conv{index}")(y))
            if index < len(layers):
                y = nn.relu(y)
        shortcut = x
        if x.shape[-1] != y.shape[-1] or self.strides != 1:
            shortcut = batch_norm(self, train, "shortcut_bn")(
                self._conv(y.shape[-1], 1, self.strides, "shortcut_conv")(x)
            )
        return nn.relu(shortcut + y)


class ResNet(nn.Module):
    """`apply(variables, x, train)` -> logits (batch, tags) of a (batch, n_mels, frames, 1) spectrogram.

    Any input of at least one band and frame works: every strided conv and pool pads, so no axis vanishes. The
    dense head's input, the last stage's channels averaged over frequency and time (8 x `base_channels` values, 32 x
    for a bottleneck ResNet), is sown as intermediates["embedding"].
    """

    num_classes: int
    stage_sizes: tuple[int, ...] = STAGE_SIZES["resnet34"]
    bottleneck: bool = False
    base_channels: int = 64
    bn_axis_name: str | None = None
    bn_momentum: float = BN_MOMENTUM
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_nhwc(x, "ResNet")
        x = nn.Conv(
            self.base_channels,
            (7, 7),
            strides=2,
            padding=[(3, 3), (3, 3)],
            use_bias=False,
            kernel_init=kaiming_fan_out,
            dtype=self.dtype,
            name="stem_conv",
        )(x.astype(self.dtype))
        x = nn.relu(batch_norm(self, train, "stem_bn")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                x = ResidualBlock(
                    features=self.base_channels * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    bottleneck=self.bottleneck,
                    bn_axis_name=self.bn_axis_name,
                    bn_momentum=self.bn_momentum,
                    dtype=self.dtype,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "embedding", x.astype(jnp.float32))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def max_rf(name: str) -> int:
    """The maximal RF of one output unit in input bins (kernels are square): RF_n = RF_{n-1} + (k_n - 1) * jump_{n-1}
    over the stem, its pool and each block's 3x3 conv (1x1 convs add nothing; a stage's first 3x3 strides by 2):
    ResNet-18 435, ResNet-34 899, ResNet-50 427, all larger than any CP-ResNet's."""
    layers = [(7, 2), (3, 2)]  # the stem conv and max-pool: (kernel, stride)
    for stage, num_blocks in enumerate(STAGE_SIZES[name]):
        for block in range(num_blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers += [(3, stride)] if BOTTLENECK[name] else [(3, stride), (3, 1)]
    rf, jump = 1, 1
    for kernel, stride in layers:
        rf += (kernel - 1) * jump
        jump *= stride
    return rf
