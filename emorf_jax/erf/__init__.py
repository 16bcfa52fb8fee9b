"""Effective receptive fields (ERF) of trained checkpoints and untrained models, side by side in one figure with each
model's maximal RF drawn on it: what `python -m emorf_jax.erf` shows.

The ERF (`receptive_field.effective_receptive_field`, Luo et al. 2016) is |d unit / d input| of the centre unit of a
model's last conv map over the input's frequency x time plane, summed over random inputs: the part of the maximal RF
that really moves the output. The maximal RF is the exact one of the CP-ResNet family, placed on the input by
`receptive_field.input_span`; the baselines' (VGG-ish, CRNN, ResNets) is not computed here, so it is not drawn.

An untrained model is the module's own initialisation, except that every kernel it initialises to zero (CP-ResNet's
Fixup conv2 and its 1x1 head) is drawn He-normal: zeros pass no gradient, and the ERF would be empty.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emorf_jax import checkpoints, report
from emorf_jax.models import receptive_field, registry

MASS_FRACTION = 0.95  # the ERF's extent: the central span of each axis that holds this share of the gradient


@dataclasses.dataclass(frozen=True)
class ErfMap:
    """One model's ERF over (frequency, time) and, where known, the rows and columns its exact maximal RF covers."""

    label: str
    erf: np.ndarray
    rf_span: tuple[tuple[int, int], tuple[int, int]] | None  # ((first, last) row, (first, last) column)

    @property
    def extent(self) -> tuple[int, int]:
        """Rows and columns of the central span that holds `MASS_FRACTION` of the gradient (`mass_extent`)."""
        return mass_extent(self.erf)


def mass_extent(erf: np.ndarray, fraction: float = MASS_FRACTION) -> tuple[int, int]:
    """(rows, columns) of the central span of each axis that holds `fraction` of the ERF's mass: from the bin where
    the axis's cumulative share reaches (1 - fraction) / 2 to the one where it reaches (1 + fraction) / 2."""
    extents = []
    for axis in (1, 0):  # the frequency profile sums over time (axis 1), the time profile over frequency
        cumulative = np.cumsum(erf.sum(axis=axis)) / erf.sum()
        first = int(np.searchsorted(cumulative, (1 - fraction) / 2))
        last = int(np.searchsorted(cumulative, (1 + fraction) / 2))
        extents.append(last - first + 1)
    return extents[0], extents[1]


def untrained_variables(model: nn.Module, input_shape: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """The model's initial variables for NHWC inputs of `input_shape`, its all-zero kernels drawn He-normal."""
    variables = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, *input_shape[1:]), jnp.float32), train=False))(
        jax.random.PRNGKey(seed)
    )
    he_normal = nn.initializers.he_normal()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    drawn = [
        he_normal(key, leaf.shape) if path[-1].key == "kernel" and not jnp.any(leaf) else leaf
        for (path, leaf), key in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, drawn)


def input_shape(features: Mapping[str, Any], frames: int, examples: int) -> tuple[int, int, int, int]:
    """NHWC of `examples` random inputs of `frames` frames with a feature setting's bands and channels (a
    checkpoint's meta["features"] or `data_prep.features.FeatureSettings.to_dict()`)."""
    return (examples, features["n_mels"], frames, 1 if features.get("mono", True) else 2)


def erf_map(label: str, fields: Mapping[str, Any], variables: Any, shape: Sequence[int], seed: int = 0) -> ErfMap:
    """The ERF of the model that the registry's `fields` describe, with `variables`, over inputs of `shape`."""
    model = registry.build(fields)
    erf = receptive_field.effective_receptive_field(model, variables, shape, seed=seed)
    rf_span = None
    if registry.model_name(fields) == "cp_resnet":
        example = jax.ShapeDtypeStruct((1, *shape[1:]), jnp.float32)
        head = jax.eval_shape(lambda x: receptive_field.last_conv_map(model, variables, x, seed=seed), example)
        rows, columns = head.shape[1:3]
        rf_span = (
            receptive_field.input_span(fields["rho"], rows // 2),
            receptive_field.input_span(fields["rho"], columns // 2),
        )
    return ErfMap(label, erf, rf_span)


def checkpoint_erf(path: str, frames: int, examples: int, seed: int = 0) -> ErfMap:
    """The ERF of a saved checkpoint (a step directory or a kind directory's latest step) on its own input bands."""
    variables, meta = checkpoints.load_checkpoint(path)
    label = f"{registry.describe(meta['model'])}\n{os.path.relpath(checkpoints.step_directory(path))}"
    return erf_map(label, meta["model"], variables, input_shape(meta["features"], frames, examples), seed)


def untrained_erf(fields: Mapping[str, Any], shape: Sequence[int], seed: int = 0) -> ErfMap:
    """The ERF of an untrained model (`untrained_variables`) that the registry's `fields` describe."""
    variables = untrained_variables(registry.build(fields), shape, seed)
    return erf_map(f"{registry.describe(fields)}\nuntrained", fields, variables, shape, seed)


def summary_line(erf: ErfMap) -> str:
    """One line: the model, its maximal RF (where drawn) and the ERF's 95 % extent."""
    rows, columns = erf.extent
    line = erf.label.replace("\n", ", ")
    if erf.rf_span is None:
        line += ": maximal RF not drawn (computed for the CP-ResNet family only)"
    else:
        (top, bottom), (left, right) = erf.rf_span
        line += f": maximal RF {bottom - top + 1} x {right - left + 1}"
    return line + f"; {MASS_FRACTION:.0%} of the ERF in {rows} bins x {columns} frames"


def plot(maps: Sequence[ErfMap], path: str) -> None:
    """The ERFs side by side (each scaled to its maximum), each with its maximal RF as a rectangle where known."""
    pyplot = report.agg_pyplot()
    from matplotlib.patches import Rectangle

    figure, axes = pyplot.subplots(
        1, len(maps), figsize=(3.6 * len(maps) + 1, 4.4), squeeze=False, layout="constrained"
    )
    for index, (ax, erf) in enumerate(zip(axes[0], maps)):
        image = ax.imshow(erf.erf / erf.erf.max(), origin="lower", cmap="magma", vmin=0, vmax=1)
        rows, columns = erf.extent
        title = f"{erf.label}\n{MASS_FRACTION:.0%} of |grad| in {rows} x {columns}"
        if erf.rf_span is None:
            title += "; max RF not drawn"
        else:
            (top, bottom), (left, right) = erf.rf_span
            corner = (left - 0.5, top - 0.5)
            ax.add_patch(Rectangle(corner, right - left + 1, bottom - top + 1, fill=False, color="cyan", lw=1.2))
            title += f"; max RF {bottom - top + 1} (cyan)"
        ax.set_xlim(-0.5, erf.erf.shape[1] - 0.5)
        ax.set_ylim(-0.5, erf.erf.shape[0] - 0.5)
        ax.set_title(title, fontsize=7)
        ax.set_xlabel("time (frames)")
        if index == 0:
            ax.set_ylabel("frequency (mel bins)")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="|d unit / d input|, scaled to its maximum")
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
