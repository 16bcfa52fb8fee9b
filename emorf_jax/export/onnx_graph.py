"""The ONNX graph of a CP-ResNet, FA-ResNet or Shake-Shake FA-ResNet, written from its Flax variables with
`onnx.helper` alone, so that exporting needs neither torch nor a trace (`export.export_onnx` is the caller).

The graph is the evaluation-mode model of `models.cp_resnet`, NCHW with H = frequency, laid out for ONNX Runtime's
CPU provider: every BatchNorm folded into the conv before it (in float64, stored as float32); each FA conv as the
conv of the input's channels plus the conv of the FA channel (`frequency_channel`), which depends on the frequency
row alone and is convolved as one (1, 1, F, T) map shared by the batch (at paper width, a batch of two 1,722-frame
windows on 2 threads took 0.84 s this way, 0.98-1.00 s with the channel concatenated to the input as the authors
do, 0.86-0.87 s with it convolved at full batch); each frequency roll of a `features_shift` model a fixed
slice-and-concatenate; a Shake-Shake block (α = 0.5 at evaluation) one block of twice the width, both branches'
conv1 as one conv and their halved conv2 as one conv over both branches' channels. The head's 1x1 conv and BatchNorm
act on the global mean (they are affine, so the mean of the head map is the head of the mean): a Gemm on the
embedding.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from emorf_jax.models.cp_resnet import (
    POOLED_BLOCKS,
    STEM_KERNEL,
    STEM_PADDING,
    STEM_STRIDE,
    CPResNet,
    block_conv_padding,
    block_names,
    frequency_channel,
)
from emorf_jax.models.layers import BN_EPSILON

_ONNX_DTYPES = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}


def _folded(params: Mapping[str, Any], stats: Mapping[str, Any], conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """(weight (out, in, kh, kw), bias (out,)) in float64 of the conv `conv` followed by the inference-mode
    BatchNorm `bn`: the BatchNorm's scale multiplies the kernel and its shift becomes the bias."""
    kernel = np.asarray(params[conv]["kernel"], np.float64).transpose(3, 2, 0, 1)
    scale = np.asarray(params[bn]["scale"], np.float64) / np.sqrt(np.asarray(stats[bn]["var"], np.float64) + BN_EPSILON)
    bias = np.asarray(params[bn]["bias"], np.float64) - np.asarray(stats[bn]["mean"], np.float64) * scale
    return kernel * scale[:, None, None, None], bias


class _Graph:
    """Nodes and initializers in the order they are added; every value gets a fresh name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: set[str] = set()  # of the initializers
        self._count = 0

    def constant(self, name: str, value: np.ndarray) -> str:
        self.names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def add(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | None = None, **attributes: Any) -> str:
        self._count += 1
        name = f"{op_type.lower()}_{self._count}"
        outputs = list(outputs or [name])
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attributes))
        return outputs[0]

    def conv(
        self,
        x: str,
        weight: np.ndarray,
        bias: np.ndarray | None,
        name: str,
        stride: int = 1,
        padding: int | None = None,
    ) -> str:
        """A Conv, by default with the authors' padding of a block conv (`block_conv_padding`)."""
        kernel = weight.shape[-1]
        padding = block_conv_padding(kernel) if padding is None else padding
        inputs = [x, self.constant(f"{name}.weight", weight.astype(np.float32))]
        if bias is not None:
            inputs.append(self.constant(f"{name}.bias", bias.astype(np.float32)))
        return self.add("Conv", inputs, kernel_shape=[kernel, kernel], pads=[padding] * 4, strides=[stride] * 2)


class _Writer:
    """Writes the blocks of one model into a `_Graph`, tracking the frequency rows of the current map."""

    def __init__(self, model: CPResNet, variables: Mapping[str, Any], shifts: Sequence[int] | None) -> None:
        self.model = model
        self.params, self.stats = variables["params"], variables["batch_stats"]
        self.shifts = shifts
        self.graph = _Graph()
        self.columns = ""  # a one-element int64 tensor: the time size of the current map (`network` sets it)
        self.frequency_maps: dict[tuple[int, str, int], str] = {}

    def roll(self, x: str, rows: int, shift: int) -> str:
        """x rolled circularly by `shift` rows along frequency (row f moves to f + shift mod F), as `jnp.roll`."""
        split = rows - shift % rows
        if split == rows:
            return x
        axis = self.integer(2)
        tail = self.graph.add("Slice", [x, self.integer(split), self.integer(rows), axis])
        head = self.graph.add("Slice", [x, self.integer(0), self.integer(split), axis])
        return self.graph.add("Concat", [tail, head], axis=2)

    def frequency_map(self, rows: int, shift: int) -> str:
        """The FA channel of the current map's size, (1, 1, F, T), rolled by `shift` rows: one per size and shift,
        its shape computed from the input's (a Shape of an activation would make ONNX Runtime copy it out of its
        blocked layout)."""
        key = (rows, self.columns, shift % rows)
        if key not in self.frequency_maps:
            name = f"frequency_channel.{rows}_rows.roll_{shift % rows}"
            channel = np.asarray(frequency_channel(np.zeros((1, rows, 1, 1), np.float32))).reshape(rows)
            column = np.roll(channel, shift).reshape(1, 1, rows, 1)
            leading = self.graph.constant(f"{name}.leading_shape", np.array([1, 1, rows], np.int64))
            shape = self.graph.add("Concat", [leading, self.columns], axis=0)
            self.frequency_maps[key] = self.graph.add("Expand", [self.graph.constant(name, column), shape])
        return self.frequency_maps[key]

    def integer(self, value: int) -> str:
        """A one-element int64 constant, written once."""
        name = f"int64.{value}"
        if name not in self.graph.names:
            self.graph.constant(name, np.array([value], np.int64))
        return name

    def block_conv(
        self, x: str, weight: np.ndarray, bias: np.ndarray, rows: int, name: str, shift: int = 0
    ) -> tuple[str, str | None]:
        """(conv of x's channels, conv of the FA channel or None): x rolled by `shift` rows first, and the FA
        channel with it, as the authors roll the concatenated map."""
        x = self.roll(x, rows, shift)
        if not self.model.frequency_aware:
            return self.graph.conv(x, weight, bias, name), None
        channels = weight.shape[1] - 1
        main = self.graph.conv(x, weight[:, :channels], bias, name)
        frequency = self.graph.conv(self.frequency_map(rows, shift), weight[:, channels:], None, f"{name}.fa")
        return main, frequency

    def branch_weights(self, prefix: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """((conv1 weight, bias), (conv2 weight, bias)) of a block, BatchNorms folded. Shake-Shake at evaluation,
        0.5 b1 + 0.5 b2, is one branch of twice the width: conv1's outputs are both branches', conv2 reads both
        branches' channels with halved weights, and the FA channel's conv2 weights are the halved sum."""
        params, stats = self.params[prefix], self.stats[prefix]
        if not self.model.shake_shake:
            return _folded(params, stats, "conv1", "bn1"), _folded(params, stats, "conv2", "bn2")
        (w1a, b1a), (w1b, b1b) = (_folded(params, stats, f"branch{k}_conv1", f"branch{k}_bn1") for k in (1, 2))
        (w2a, b2a), (w2b, b2b) = (_folded(params, stats, f"branch{k}_conv2", f"branch{k}_bn2") for k in (1, 2))
        width = w2a.shape[0]
        parts = [0.5 * w2a[:, :width], 0.5 * w2b[:, :width]]
        if self.model.frequency_aware:
            parts.append(0.5 * (w2a[:, width:] + w2b[:, width:]))
        conv1 = (np.concatenate([w1a, w1b]), np.concatenate([b1a, b1b]))
        return conv1, (np.concatenate(parts, axis=1), 0.5 * (b2a + b2b))

    def block(self, x: str, rows: int, stage: int, block: int, shift: int) -> str:
        """ReLU(shortcut(x) + branch(x)), the branch conv1 - ReLU - conv2 with BatchNorms folded."""
        prefix, name = f"stage{stage}_block{block}", f"cp_resnet.stage{stage}.block{block}"
        (weight1, bias1), (weight2, bias2) = self.branch_weights(prefix)
        shortcut = x
        if "shortcut_conv" in self.params[prefix]:
            shortcut_weight, shortcut_bias = _folded(
                self.params[prefix], self.stats[prefix], "shortcut_conv", "shortcut_bn"
            )
            shortcut = self.graph.conv(x, shortcut_weight, shortcut_bias, f"{name}.shortcut")
        hidden, frequency = self.block_conv(x, weight1, bias1, rows, f"{name}.conv1", shift)
        if frequency is not None:
            hidden = self.graph.add("Add", [hidden, frequency])
        hidden = self.graph.add("Relu", [hidden])
        y, frequency = self.block_conv(hidden, weight2, bias2, rows, f"{name}.conv2")
        if frequency is not None:
            shortcut = self.graph.add("Add", [shortcut, frequency])
        return self.graph.add("Relu", [self.graph.add("Add", [y, shortcut])])

    def network(self, x: str, stored: str, n_mels: int) -> tuple[str, str]:
        """(logits, embedding) of the normalised NCHW input x of the stored windows `stored` (batch, frames, ...)."""
        weight, bias = _folded(self.params, self.stats, "in_c_conv", "in_c_bn")
        x = self.graph.add("Relu", [self.graph.conv(x, weight, bias, "cp_resnet.in_c", STEM_STRIDE, STEM_PADDING)])
        rows = (n_mels + 2 * STEM_PADDING - STEM_KERNEL) // STEM_STRIDE + 1
        frames = self.graph.add("Shape", [stored], start=1, end=2)
        reach = self.graph.add("Add", [frames, self.integer(2 * STEM_PADDING - STEM_KERNEL)])
        self.columns = self.graph.add(
            "Add", [self.graph.add("Div", [reach, self.integer(STEM_STRIDE)]), self.integer(1)]
        )
        for index, (stage, block) in enumerate(block_names()):
            shift = 0 if self.shifts is None else int(self.shifts[index])
            x = self.block(x, rows, stage, block, shift)
            if (stage, block) in POOLED_BLOCKS:
                x = self.graph.add("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
                rows //= 2
                self.columns = self.graph.add("Div", [self.columns, self.integer(2)])
        pooled = self.graph.add("GlobalAveragePool", [x])
        embedding = self.graph.add("Flatten", [pooled], axis=1)
        weight, bias = _folded(self.params, self.stats, "feed_forward_conv", "feed_forward_bn")
        head_weight = self.graph.constant("cp_resnet.feed_forward.weight", weight[:, :, 0, 0].astype(np.float32))
        head_bias = self.graph.constant("cp_resnet.feed_forward.bias", bias.astype(np.float32))
        logits = self.graph.add("Gemm", [embedding, head_weight, head_bias], transB=1)
        return logits, embedding


def build(
    model: CPResNet,
    variables: Mapping[str, Any],
    mean: np.ndarray,
    std: np.ndarray,
    shifts: Sequence[int] | None,
    input_dtype: str,
    names: tuple[str, str, str],
    opset: int,
    metadata: Mapping[str, Any],
) -> onnx.ModelProto:
    """The checked ONNX model from stored windows (`names[0]`: time-major (batch, frames, n_mels), or (batch, frames,
    channels, n_mels) when `mean` is (channels, n_mels), in `input_dtype`) to logits (`names[1]`, (batch, tags)) and
    the pooled features the head reads (`names[2]`, (batch, 4 x base_channels)), normalised inside as
    `windowing.model_input` does; batch and frames dynamic. `shifts`: the fixed per-block frequency rolls of a
    `features_shift` model (`export.evaluation_shifts`), None for none. `metadata`: stored as metadata_props, one
    JSON value per key."""
    input_name, output_name, embedding_name = names
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    n_mels = mean.shape[-1]
    writer = _Writer(model, variables, shifts)
    graph = writer.graph
    stored = input_name if input_dtype == "float32" else graph.add("Cast", [input_name], to=TensorProto.FLOAT)
    normalised = graph.add(
        "Div",
        [
            graph.add("Sub", [stored, graph.constant("normalisation.mean", mean)]),
            graph.constant("normalisation.std", std),
        ],
    )
    if mean.ndim == 1:
        normalised = graph.add("Unsqueeze", [normalised, writer.integer(2)])
    x = graph.add("Transpose", [normalised], perm=[0, 2, 3, 1])  # (batch, channels, n_mels, frames)
    logits, embedding = writer.network(x, input_name, n_mels)
    graph.add("Identity", [logits], [output_name])
    graph.add("Identity", [embedding], [embedding_name])
    tags, width = model.num_classes, 4 * model.base_channels
    onnx_graph = helper.make_graph(
        graph.nodes,
        "cp_resnet",
        [helper.make_tensor_value_info(input_name, _ONNX_DTYPES[input_dtype], ["batch", "frames", *mean.shape])],
        [
            helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", tags]),
            helper.make_tensor_value_info(embedding_name, TensorProto.FLOAT, ["batch", width]),
        ],
        graph.initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    onnx_model = helper.make_model(
        onnx_graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets), producer_name="emorf_jax"
    )
    helper.set_model_props(onnx_model, {key: json.dumps(value) for key, value in metadata.items()})
    onnx.checker.check_model(onnx_model)
    return onnx_model
