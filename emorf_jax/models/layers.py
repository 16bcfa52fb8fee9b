"""The layers every model family builds on (CP-ResNet and the baselines): PyTorch-style BatchNorm, the NHWC input
check, Kaiming initialisation and the conv - BatchNorm - ELU - max-pool blocks that VGG-ish and the CRNN share.

Each model owns its parameters; these helpers only build layers inside the owner's compact call, so the parameter
names (and hence checkpoints and the import of the authors' weights) are those of the model that calls them.
"""

from __future__ import annotations

import flax.linen as nn
import jax

BN_EPSILON = 1e-5  # PyTorch's default
BN_MOMENTUM = 0.9  # Flax convention for PyTorch's running-average momentum 0.1

# Kaiming-normal with ReLU gain, as torch.nn.init.kaiming_normal_ (a plain, not truncated, normal).
kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(owner: nn.Module, train: bool, name: str) -> nn.BatchNorm:
    """PyTorch-style BatchNorm (eps 1e-5) with the owner's momentum, sync axis and compute dtype."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=owner.bn_momentum,
        epsilon=BN_EPSILON,
        axis_name=owner.bn_axis_name,
        dtype=owner.dtype,
        name=name,
    )


def check_nhwc(x: jax.Array, model_name: str) -> None:
    """Every model takes (batch, frequency, time, channels): say so instead of failing deep inside."""
    if x.ndim != 4:
        raise ValueError(f"{model_name} expects NHWC input (batch, frequency, time, channels), got shape {x.shape}")


def clipped_max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """Non-overlapping max-pool of an NHWC map (remainders dropped, as PyTorch's MaxPool2d), each window side
    clipped to the map's size so that no axis vanishes."""
    window = tuple(min(size, side) for size, side in zip(window, x.shape[1:3]))
    return nn.max_pool(x, window, strides=window, padding="VALID")


def conv_elu_blocks(
    owner: nn.Module,
    x: jax.Array,
    train: bool,
    widths: tuple[int, ...],
    pools: tuple[tuple[int, int], ...],
    dropout: float = 0.0,
) -> jax.Array:
    """The input BatchNorm, then per block a 3x3 conv (padding 1, with bias) - BatchNorm - ELU - clipped max-pool
    (- dropout): the convolutional part that VGG-ish and the CRNN share, built inside `owner`'s compact call."""
    x = batch_norm(owner, train, "bn_init")(x.astype(owner.dtype))
    for index, (features, pool) in enumerate(zip(widths, pools), start=1):
        x = nn.Conv(features, (3, 3), padding=[(1, 1), (1, 1)], dtype=owner.dtype, name=f"conv_{index}")(x)
        x = clipped_max_pool(nn.elu(batch_norm(owner, train, f"bn_{index}")(x)), pool)
        if dropout:
            x = nn.Dropout(dropout, deterministic=not train)(x)
    return x
