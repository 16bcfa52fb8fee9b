"""The convolutional recurrent network of Choi et al. 2017, "Convolutional recurrent neural networks for music
classification", one row of the paper's table (docs/fidelity.md, "Baselines").

A BatchNorm of the input; four blocks of 3x3 conv (64, 128, 128, 128 channels) - BatchNorm - ELU - max-pool
(2x2, 3x3, 4x4, 4x4) - dropout 0.1; the map read as a sequence over time (frequency rows x channels per step; for
96 bands the rows are pooled to 1, as in Choi et al.); two GRU layers of 32 units, the last state of the second
through dropout 0.3 into a dense layer. Pools are clipped to the map they pool (`layers.clipped_max_pool`), so
short inputs still give at least one time step.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from emorf_jax.models.layers import BN_MOMENTUM, check_nhwc, conv_elu_blocks

POOLS = ((2, 2), (3, 3), (4, 4), (4, 4))
WIDTH_FACTORS = (1, 2, 2, 2)  # of `base_channels`: 64, 128, 128, 128


class CRNN(nn.Module):
    """`apply(variables, x, train)` -> logits (batch, tags) of a (batch, n_mels, frames, 1) spectrogram.

    Dropout draws from the rng stream "dropout" in training. The dense layer's input, the second GRU's last state
    (`gru_units` values), is sown as intermediates["embedding"].
    """

    num_classes: int
    base_channels: int = 64
    gru_units: int = 32
    conv_dropout: float = 0.1
    dropout: float = 0.3
    bn_axis_name: str | None = None
    bn_momentum: float = BN_MOMENTUM
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_nhwc(x, "CRNN")
        x = conv_elu_blocks(
            self, x, train, tuple(self.base_channels * f for f in WIDTH_FACTORS), POOLS, dropout=self.conv_dropout
        )
        batch, rows, steps, channels = x.shape
        sequence = jnp.transpose(x, (0, 2, 1, 3)).reshape(batch, steps, rows * channels)
        for index in (1, 2):
            sequence = nn.RNN(nn.GRUCell(self.gru_units, dtype=self.dtype, name=f"gru{index}"))(sequence)
        last = sequence[:, -1]
        self.sow("intermediates", "embedding", last.astype(jnp.float32))
        last = nn.Dropout(self.dropout, deterministic=not train)(last)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="output")(last).astype(jnp.float32)
