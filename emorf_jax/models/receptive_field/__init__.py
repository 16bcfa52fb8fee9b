"""Kernel schedules of CP-ResNet for a ρ, their receptive fields (RF), and the inverse ρ for a maximal RF.

The schedule itself lives with the architecture in cp_resnet.py and is re-exported here. ρ decides which block
convs are 3x3 (the rest are 1x1), and so how far the RF grows (docs/fidelity.md, "Model"). Two RFs are offered: the
"published" one computed as the authors' code does (the numbers in their slides and papers), and the exact
layer-by-layer one that counts the stem and each max-pool's own window. `input_span` places the exact RF of one
output unit on the input, and `effective_receptive_field` measures the part of it that really moves the unit.

Command line (__main__.py): `python -m emorf_jax.models.receptive_field --rho 5` or `--max_rf 100` prints the
per-layer table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emorf_jax.models.cp_resnet import (
    MAX_RHO,
    POOLED_BLOCKS,
    STEM_KERNEL,
    STEM_PADDING,
    STEM_STRIDE,
    block_names,
    kernel_schedule,
)

__all__ = [
    "Layer",
    "MAX_RHO",
    "POOLED_BLOCKS",
    "RF_KINDS",
    "block_names",
    "effective_receptive_field",
    "exact_rf",
    "format_table",
    "input_span",
    "kernel_schedule",
    "last_conv_map",
    "layer_table",
    "published_rf",
    "rho_for_max_rf",
]


class Layer(NamedTuple):
    """One row of the RF table: `jump` is the cumulative stride after the layer, `rf` the exact RF after it."""

    name: str
    kernel: int
    stride: int
    jump: int
    rf: int


def _pool_follows(conv_name: str) -> bool:
    """Whether a max-pool comes right after this block conv (conv2 of a pooled block)."""
    stage, block, conv = conv_name.split(".")
    return conv == "conv2" and (int(stage.removeprefix("stage")), int(block.removeprefix("block"))) in POOLED_BLOCKS


def _layers(rho: int) -> list[tuple[str, int, int, int]]:
    """(name, kernel, stride, padding) of every layer that moves the RF: stem, block convs and max-pools. A block
    conv pads (kernel - 1) // 2 on each side, "same" as in cp_resnet.py (1 for 3x3, 0 for 1x1); a pool pads none."""
    layers = [("in_c.0", STEM_KERNEL, STEM_STRIDE, STEM_PADDING)]
    for name, kernel in kernel_schedule(rho):
        layers.append((name, kernel, 1, (kernel - 1) // 2))
        if _pool_follows(name):
            layers.append((name.removesuffix("conv2") + "pool", 2, 2, 0))
    return layers


def layer_table(rho: int) -> list[Layer]:
    """Every layer with its cumulative stride and exact RF: RF_n = RF_{n-1} + (k_n - 1) * jump_{n-1}."""
    table, jump, rf = [], 1, 1
    for name, kernel, stride, _ in _layers(rho):
        rf += (kernel - 1) * jump
        jump *= stride
        table.append(Layer(name, kernel, stride, jump, rf))
    return table


def exact_rf(rho: int) -> int:
    """The true RF of one output unit in input frames (= bins; kernels are square): ρ=5 -> 87."""
    return layer_table(rho)[-1].rf


def published_rf(rho: int) -> int:
    """The RF as the authors computed it (ρ=5 -> 81): from (S, RF) = (2, 5) after the stem, over the 24 block convs,
    S_n = S_{n-1} * s_n and RF_n = RF_{n-1} + (k_n - 1) * S_n, where a max-pool's stride is charged to the conv
    just before it and the pool's own window is ignored. Kept because the papers' ρ/RF numbers use it."""
    jump, rf = STEM_STRIDE, STEM_KERNEL
    for name, kernel in kernel_schedule(rho):
        jump *= 2 if _pool_follows(name) else 1
        rf += (kernel - 1) * jump
    return rf


RF_KINDS: dict[str, Callable[[int], int]] = {"published": published_rf, "exact": exact_rf}


def rho_for_max_rf(max_rf: int, kind: str = "published") -> int:
    """The ρ with the largest RF not above `max_rf`, so a config can ask for an RF instead of a ρ."""
    if kind not in RF_KINDS:
        raise ValueError(f"kind must be one of {sorted(RF_KINDS)}, got {kind!r}")
    rf_of = RF_KINDS[kind]
    fitting = [rho for rho in range(MAX_RHO + 1) if rf_of(rho) <= max_rf]
    if not fitting:
        raise ValueError(f"max_rf={max_rf} is below the smallest {kind} RF, {rf_of(0)} (rho=0)")
    return max(fitting, key=rf_of)


def input_span(rho: int, index: int) -> tuple[int, int]:
    """The first and last input row (or column: kernels are square) that unit `index` of the head map reads, the
    exact RF placed on the input; indices below 0 or past the input's end fall on zero padding."""
    first, last = index, index
    for _, kernel, stride, padding in reversed(_layers(rho)):
        first, last = first * stride - padding, last * stride - padding + kernel - 1
    return first, last


def last_conv_map(model: nn.Module, variables: Any, x: jax.Array, *, seed: int = 0) -> jax.Array:
    """The output of the last `nn.Conv` that `model` applies to the NHWC input `x`, in evaluation mode: CP-ResNet's
    1x1 head (one map per tag), the last 3x3 conv of VGG-ish and the CRNN, the last conv of a ResNet's last block.

    Every model of the registry pools that map globally (or reads it as a sequence), so it is the last place where
    an output unit has a position on the input. A model with a frequency roll rolls every block by the same shifts
    for every input (`seed`).
    """
    outputs = []

    def keep_conv_outputs(next_fun, args, kwargs, context):
        output = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            outputs.append(output)
        return output

    with nn.intercept_methods(keep_conv_outputs):
        model.apply(variables, x, train=False, rngs={"shift": jax.random.PRNGKey(seed)}, mutable=["intermediates"])
    if not outputs:
        raise ValueError(f"{type(model).__name__} applies no nn.Conv: it has no convolutional map to take an ERF of")
    return outputs[-1]


def effective_receptive_field(model: Any, variables: Any, input_shape: Sequence[int], *, seed: int = 0) -> np.ndarray:
    """|d output / d input| (frequency x time) of the centre unit of the last conv map (`last_conv_map`; Luo et al.
    2016), summed over the batch, the input channels and the map's channels, for random normal inputs of
    `input_shape` (NHWC).

    Max-pools route each gradient to one input of their window, so a batch of several inputs shows the whole
    area that can move the output. Evaluation mode: BatchNorm uses its running statistics.
    """
    inputs = jax.random.normal(jax.random.PRNGKey(seed), tuple(input_shape), jnp.float32)

    def centre_of_map(x: jax.Array) -> jax.Array:
        feature_map = last_conv_map(model, variables, x, seed=seed)
        return feature_map[:, feature_map.shape[1] // 2, feature_map.shape[2] // 2, :].sum()

    def per_example_abs_gradient(x: jax.Array) -> jax.Array:
        return jnp.abs(jax.grad(centre_of_map)(x[None]))[0]

    gradients = jax.jit(jax.vmap(per_example_abs_gradient))(inputs)
    return np.asarray(gradients.sum(axis=(0, 3)))


def format_table(rho: int) -> str:
    """The per-layer table and both RFs, as printed by the command line."""
    header = f"{'layer':<22}{'kernel':>7}{'stride':>7}{'jump':>6}{'RF':>6}"
    rows = [
        f"{layer.name:<22}{layer.kernel:>7}{layer.stride:>7}{layer.jump:>6}{layer.rf:>6}" for layer in layer_table(rho)
    ]
    footer = [
        f"rho = {rho}",
        f"published RF (the authors' formula): {published_rf(rho)}",
        f"exact RF (layer by layer): {exact_rf(rho)}",
    ]
    return "\n".join([header, *rows, *footer])
