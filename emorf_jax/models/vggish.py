"""The organisers' MediaEval 2019 baseline ("VGG-ish"): the fully convolutional network of Choi et al. 2016,
"Automatic tagging using deep convolutional neural networks", narrowed as in the task's baseline code
(docs/fidelity.md, "Baselines").

Five blocks of 3x3 conv (padding 1, with bias) - BatchNorm - ELU - max-pool, after a BatchNorm of the input, then
dropout and one dense layer. The pools (2,4), (2,4), (2,4), (3,5), (4,4) (frequency, time) take the organisers' 96
mel bands x 1,366 frames (29 s) to 1x1. On other inputs (our 256 bands, shorter windows) the same pools apply, each
clipped to the size of the map it pools, and whatever remains after the fifth is max-pooled globally: for 96 x
1,366 input that is the organisers' network exactly, and any input of at least one frame and band gives logits.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from emorf_jax.models.layers import BN_MOMENTUM, check_nhwc, conv_elu_blocks

# (frequency, time) max-pool after each conv block, for 96 bands x 1,366 frames.
POOLS = ((2, 4), (2, 4), (2, 4), (3, 5), (4, 4))
# Channels of the five convs as multiples of `base_channels`: the organisers' 64, 128, 128, 128, 64.
WIDTH_FACTORS = (1, 2, 2, 2, 1)


class VGGish(nn.Module):
    """`apply(variables, x, train)` -> logits (batch, tags) of a (batch, n_mels, frames, 1) spectrogram.

    Dropout (before the dense layer) draws from the rng stream "dropout" in training. The dense layer's input,
    the last block's channels max-pooled globally (`base_channels` values), is sown as intermediates["embedding"].
    """

    num_classes: int
    base_channels: int = 64
    dropout: float = 0.5
    bn_axis_name: str | None = None
    bn_momentum: float = BN_MOMENTUM
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_nhwc(x, "VGGish")
        x = conv_elu_blocks(self, x, train, tuple(self.base_channels * f for f in WIDTH_FACTORS), POOLS)
        x = jnp.max(x, axis=(1, 2))
        self.sow("intermediates", "embedding", x.astype(jnp.float32))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="dense")(x).astype(jnp.float32)
