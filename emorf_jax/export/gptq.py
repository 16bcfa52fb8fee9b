"""int8 convolution weights rounded so that each convolution's outputs on the calibration windows change least
(GPTQ: each weight is rounded in turn and the error it leaves is compensated on the weights of the same output
channel not rounded yet, through the inverse of the Gram matrix of the convolution's unfolded inputs).

Rounding each weight to the nearest step leaves errors that add up in the outputs: on the demo's trained model the
first stage's int8 weights alone moved the top-5 set of 2.2 % of tracks; rounded here, 0.3 % (docs/tagging.md, "ONNX
Runtime and int8"). The steps are ONNX Runtime's own: symmetric int8 per output channel, the channel's largest
magnitude over 127. The rounded weights are written back as float multiples of those steps, which ONNX Runtime's
quantiser then stores exactly, as long as each channel keeps its largest weight at +-127 steps; a channel whose
largest weight the compensation moved is rounded to nearest instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Calibration windows whose inputs enter the Gram matrices (spread over all of them: the first windows come from the
# same file), and output positions per window: at the paper's width a block conv has 1,152 inputs per position, and
# 16 windows of 4,096 positions are 57 times that.
GRAM_WINDOWS = 16
POSITIONS_PER_WINDOW = 4096
# Added to the Gram matrix's diagonal, as a share of its mean, so that inputs that never vary can be inverted.
DAMPING = 0.01
INT8_STEPS = 127  # ONNX Runtime's symmetric int8 weights: -127 ... 127 steps of max |w| / 127


def _attributes(node: onnx.NodeProto) -> dict:
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def unfolded_inputs(inputs: np.ndarray, node: onnx.NodeProto, count: int, rng: np.random.Generator) -> np.ndarray:
    """(in_channels * kh * kw, positions) float32: the inputs (1, C, H, W) that a Conv `node` (group 1) multiplies by
    its weights, in the order of its weights' (C, kh, kw) axes, at `count` distinct random output positions in
    order (all of them, when there are no more)."""
    attributes = _attributes(node)
    if attributes.get("group", 1) != 1:
        raise ValueError(f"{node.name}: grouped convolutions are not rounded by GPTQ")
    kernel = attributes["kernel_shape"]
    top, left, bottom, right = attributes.get("pads", [0, 0, 0, 0])
    stride = attributes.get("strides", [1, 1])
    dilation = attributes.get("dilations", [1, 1])
    padded = np.pad(inputs[0], ((0, 0), (top, bottom), (left, right)))
    span = [dilation[k] * (kernel[k] - 1) + 1 for k in range(2)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, span, axis=(1, 2))
    windows = windows[:, :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]]  # C, H', W', kh, kw
    total = windows.shape[1] * windows.shape[2]
    positions = np.arange(total) if total <= count else np.sort(rng.choice(total, count, replace=False))
    rows, columns = np.unravel_index(positions, windows.shape[1:3])
    return windows[:, rows, columns].transpose(0, 2, 3, 1).reshape(-1, len(positions)).astype(np.float32)


def rounded_weights(weights: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """float32 weights (out, in, kh, kw) that are multiples of ONNX Runtime's int8 steps per output channel, rounded
    one input at a time with the error compensated on the inputs after it (`gram`: X X^T of the unfolded inputs)."""
    rows = weights.reshape(len(weights), -1).astype(np.float64)
    steps = np.abs(rows).max(axis=1, keepdims=True) / INT8_STEPS
    steps[steps == 0] = 1.0  # an all-zero channel stays zero
    damped = gram + np.eye(len(gram)) * DAMPING * max(float(np.mean(np.diag(gram))), 1e-12)
    inverse = np.linalg.cholesky(np.linalg.inv(damped)).T  # upper triangular: the inverse's Cholesky factor
    remaining, levels = rows.copy(), np.empty_like(rows)
    for column in range(rows.shape[1]):
        levels[:, column] = np.clip(np.round(remaining[:, column] / steps[:, 0]), -INT8_STEPS, INT8_STEPS)
        error = (remaining[:, column] - levels[:, column] * steps[:, 0]) / inverse[column, column]
        remaining[:, column + 1 :] -= np.outer(error, inverse[column, column + 1 :])
    moved = np.abs(levels).max(axis=1) < INT8_STEPS  # the channel's step would change: rounded to nearest instead
    levels[moved] = np.round(rows[moved] / steps[moved])
    return (levels * steps).reshape(weights.shape).astype(np.float32)


def round_convolutions(
    model: onnx.ModelProto, names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]], seed: int = 0
) -> onnx.ModelProto:
    """A copy of `model` whose Conv nodes `names` have GPTQ-rounded weights, their Gram matrices taken over the
    inputs that the float model gives them on `GRAM_WINDOWS` of `feeds` (its inputs, one calibration window each),
    at `POSITIONS_PER_WINDOW` random output positions per window (`seed`: the same rounding every time); each
    window's products in float32, their sum in float64."""
    import onnxruntime

    nodes = {node.name: node for node in model.graph.node if node.op_type == "Conv"}
    missing = [name for name in names if name not in nodes]
    if missing:
        raise ValueError(f"no Conv nodes named {missing} in the model")
    convolutions = [nodes[name] for name in names]
    inputs = list(dict.fromkeys(node.input[0] for node in convolutions))
    reader = onnx.ModelProto()
    reader.CopyFrom(model)
    del reader.graph.output[:]
    reader.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in inputs)
    session = onnxruntime.InferenceSession(reader.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    grams: list[np.ndarray | float] = [0.0] * len(convolutions)
    for feed in feeds[:: max(1, len(feeds) // GRAM_WINDOWS)][:GRAM_WINDOWS]:
        values = dict(zip(inputs, session.run(inputs, feed)))
        for index, node in enumerate(convolutions):
            columns = unfolded_inputs(values[node.input[0]], node, POSITIONS_PER_WINDOW, rng)
            grams[index] = grams[index] + (columns @ columns.T).astype(np.float64)
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    initializers = {tensor.name: tensor for tensor in rounded.graph.initializer}
    for node, gram in zip(convolutions, grams):
        tensor = initializers[node.input[1]]
        tensor.CopyFrom(numpy_helper.from_array(rounded_weights(numpy_helper.to_array(tensor), gram), tensor.name))
    return rounded
