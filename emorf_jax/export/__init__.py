"""A checkpoint out of JAX: the authors' PyTorch state_dict with the model's settings beside it, or an ONNX model
from stored spectrogram windows to logits (`python -m emorf_jax.export` is the command).

Both carry what a checkpoint's meta says (model, tags, feature setting, normalisation, evaluation window), so that a
PyTorch or ONNX Runtime user tags as `emorf_jax.tagger` does. Only the CP-ResNet family (CP-ResNet, FA-ResNet,
Shake-Shake FA-ResNet) is exported: the state_dict format is the authors' layout of that family, and the ONNX graph
is written from the Flax variables by `onnx_graph`, which builds that family's layers; the baselines (VGG-ish,
ResNet-18/34/50, CRNN) have neither. The ONNX model needs only onnx and onnxruntime, part of the plain install, so
that the onnxruntime tagging backend does too; the torch format needs torch (the `[export]` extra).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from emorf_jax import checkpoints, split_predictions
from emorf_jax.models import registry
from emorf_jax.models.cp_resnet import MIN_INPUT_SIZE, POOLED_BLOCKS, CPResNet, block_names
from emorf_jax.models.torch_export import to_torch_state_dict

if TYPE_CHECKING:  # torch is optional: the [export] extra; onnx is imported where a graph is read or written
    import onnx

    from emorf_jax.models.torch_cp_resnet import TorchCPResNet

FORMATS = ("torch", "onnx")
OPSET = 18  # the ONNX operator set of the exported graphs: onnxruntime >= 1.14 runs it
INPUT_NAME, OUTPUT_NAME, EMBEDDING_NAME = "spectrogram", "logits", "embedding"
INPUT_DTYPES = ("float16", "float32")
PRECISIONS = ("float32", "int8")
INT8_SCOPES = ("all", "convolutions", "stage1_convolutions", "stage1_leading_3x3")
INT8_METHODS = ("minmax", "percentile", "entropy")
INT8_ROUNDINGS = ("nearest", "gptq")
# What `predict --precision int8` quantises: part of the cached copy's key (with GPTQ's sample and damping), so that
# another default quantises again.
INT8_DEFAULT = {"scope": "stage1_leading_3x3", "method": "minmax", "reduce_range": False, "rounding": "gptq"}
# Stage 1's blocks up to its second pooling (`POOLED_BLOCKS`): the two highest resolutions, scope stage1_leading_3x3.
LEADING_BLOCKS = tuple(range(1, sorted(block for stage, block in POOLED_BLOCKS if stage == 1)[1] + 1))
SETTINGS_FORMAT = "emorf_jax.export/1"
GRAPH_FORMAT = "onnx_graph/1"  # part of the cache key of exported models: a new layout of the graph exports again
# What the plain install brings for the ONNX format and the onnxruntime backend, and what the torch format adds.
INSTALL_HINT = "onnx and onnxruntime come with the plain install: pip install -e ."
TORCH_INSTALL_HINT = "the torch format needs torch: pip install -e '.[export]'"


class UnsupportedModel(ValueError):
    """A checkpoint of a model that the formats cannot carry (a baseline)."""


def load(checkpoint: str) -> tuple[CPResNet, dict[str, Any], dict[str, Any]]:
    """(model, variables, meta) of a checkpoint directory, as `tagger.load_tagger` loads it; raises
    FileNotFoundError for a missing checkpoint and UnsupportedModel, saying why, for a baseline."""
    variables, meta = checkpoints.load_checkpoint(checkpoint)
    name = registry.model_name(meta["model"])
    if name != "cp_resnet":
        raise UnsupportedModel(
            f"{checkpoint} holds a {registry.DISPLAY_NAMES[name]}: only CP-ResNet, FA-ResNet and Shake-Shake "
            "FA-ResNet checkpoints can be exported. The torch format is the authors' CP-ResNet layout, and the ONNX "
            "graph is written from that family's layers; VGG-ish, ResNet-18/34/50 and CRNN have neither here (tag "
            "with them through `python -m emorf_jax.predict`)"
        )
    return registry.build(meta["model"]), variables, meta


def evaluation_shifts(model: CPResNet, variables: dict[str, Any], meta: dict[str, Any]) -> list[int] | None:
    """The per-block frequency rolls that evaluation (`split_predictions.logits_step`) draws for a `features_shift`
    model, in network order; None without `features_shift`. They depend on the seed alone, not on the input."""
    if not model.features_shift:
        return None
    mean = np.asarray(meta["normalisation"]["mean"], np.float32)
    channels = 1 if mean.ndim == 1 else mean.shape[0]
    probe = np.zeros((1, mean.shape[-1], MIN_INPUT_SIZE, channels), np.float32)
    rngs = {"shift": jax.random.PRNGKey(split_predictions.EVALUATION_SHIFT_SEED)}
    _, state = model.apply(variables, probe, train=False, rngs=rngs, mutable=["intermediates"])
    drawn = state["intermediates"]
    return [int(drawn[f"stage{stage}_block{block}"]["features_shift"][0]) for stage, block in block_names()]


def settings(model: CPResNet, variables: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """What the exported files carry beside the weights (JSON): the model (and `torch_model`, the arguments of
    `models.torch_cp_resnet.TorchCPResNet`), tags, feature setting, normalisation, evaluation window, source."""
    return {
        "format": SETTINGS_FORMAT,
        "model": dict(meta["model"]),
        "description": registry.describe(meta["model"]),
        "torch_model": {
            "num_classes": model.num_classes,
            "rho": model.rho,
            "base_channels": model.base_channels,
            "frequency_aware": model.frequency_aware,
            "shake_shake": model.shake_shake,
            "in_channels": int(variables["params"]["in_c_conv"]["kernel"].shape[2]),
            "shifts": evaluation_shifts(model, variables, meta),
        },
        "tags": list(meta["tags"]),
        "features": dict(meta["features"]),
        "normalisation": dict(meta["normalisation"]),
        "window_frames": int(meta["window_frames"]),
        "checkpoint": {key: meta[key] for key in ("kind", "step") if key in meta},
    }


def _torch():
    """torch, or an ImportError with the pip line."""
    try:
        return importlib.import_module("torch")  # optional: the [export] extra
    except ImportError as error:
        raise ImportError(f"torch is not installed; {TORCH_INSTALL_HINT}") from error


def torch_model(settings: dict[str, Any], state_dict: dict[str, Any]) -> TorchCPResNet:
    """The package's PyTorch model (`TorchCPResNet`) of exported `settings`, with `state_dict` loaded (strict), in
    inference mode."""
    torch = _torch()
    from emorf_jax.models import torch_cp_resnet

    model = torch_cp_resnet.TorchCPResNet(**settings["torch_model"])
    model.load_state_dict({key: torch.as_tensor(value) for key, value in state_dict.items()})
    return model.eval()


def export_torch(checkpoint: str, output: str | Path) -> list[Path]:
    """Writes the checkpoint's state_dict in the authors' names and layout to `output` (`torch.save`) and its
    settings to `output` with the suffix `.json`; returns both paths."""
    torch = _torch()
    model, variables, meta = load(checkpoint)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {key: torch.from_numpy(value) for key, value in to_torch_state_dict(variables).items()}
    torch.save(state_dict, output)
    settings_path = output.with_suffix(".json")
    settings_path.write_text(json.dumps(settings(model, variables, meta), indent=1))
    return [output, settings_path]


def export_onnx(checkpoint: str, output: str | Path, input_dtype: str = "float16") -> Path:
    """Writes an ONNX model (opset `OPSET`, one file) from stored windows `spectrogram`, time-major (batch, frames,
    n_mels) or stereo (batch, frames, 2, n_mels) in `input_dtype`, to `logits` (batch, tags) and `embedding`
    (batch, 4 x base_channels; the pooled features the head reads), normalisation included, batch and frames
    dynamic; the settings are in its metadata_props, one JSON value per key."""
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input dtype {input_dtype!r}: use one of {', '.join(INPUT_DTYPES)}")
    try:
        from emorf_jax.export import onnx_graph
    except ImportError as error:
        raise ImportError(f"the ONNX export needs onnx ({error}); {INSTALL_HINT}") from error

    model, variables, meta = load(checkpoint)
    exported = settings(model, variables, meta)
    norm = exported["normalisation"]
    mean, std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
    layout = "(batch, frames, n_mels)" if mean.ndim == 1 else "(batch, frames, channels, n_mels)"
    exported["input"] = f"{INPUT_NAME}: {input_dtype} {layout}, as the shards store windows; normalised inside"
    onnx_model = onnx_graph.build(
        model,
        variables,
        mean,
        std,
        exported["torch_model"]["shifts"],
        input_dtype,
        (INPUT_NAME, OUTPUT_NAME, EMBEDDING_NAME),
        OPSET,
        exported,
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(onnx_model.SerializeToString())
    return output


def quantize_onnx(
    model: str | Path,
    calibration: Sequence[np.ndarray],
    output: str | Path,
    scope: str = INT8_DEFAULT["scope"],
    method: str = INT8_DEFAULT["method"],
    reduce_range: bool = INT8_DEFAULT["reduce_range"],
    rounding: str = INT8_DEFAULT["rounding"],
) -> Path:
    """An int8 copy of an exported model (ONNX Runtime's static QDQ quantisation: int8 weights per output channel,
    7-bit with `reduce_range`, and uint8 activations whose ranges `method` sets from `calibration`, stored windows
    (frames, *frame_shape) as the model's input takes them, one at a time). `scope` says what runs in int8: every
    operator ONNX Runtime quantises ("all"), every convolution, the first stage's convolutions (86 % of the FLOPs at
    the paper's width), or the 3x3 convolutions of its first two blocks, at the two highest resolutions (71 %); the
    rest stays float32. `rounding`: the convolutions' weights rounded to the nearest step, or so that their outputs on
    the calibration windows change least (`gptq`). The default, the leading 3x3 convolutions with GPTQ rounding and
    the minima and maxima as ranges, moved the tags least of the settings measured, and ran fastest at the paper's
    width (benchmarks/RESULTS.md, "int8 that keeps the tags"); with "minmax" the calibration keeps only each
    tensor's extremes per window, so memory does not grow with their number."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from emorf_jax.export import gptq

    if not calibration:
        raise ValueError("int8 quantisation needs at least one calibration window")
    if scope not in INT8_SCOPES or method not in INT8_METHODS or rounding not in INT8_ROUNDINGS:
        raise ValueError(
            f"int8 scope {scope!r}, method {method!r}, rounding {rounding!r}: "
            f"use {INT8_SCOPES}, {INT8_METHODS} and {INT8_ROUNDINGS}"
        )
    feeds = [{INPUT_NAME: np.asarray(window, np.float16)[None]} for window in calibration]

    class Windows(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.remaining, None)

    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="emorf_quantize_", dir=output.parent) as directory:
        prepared = Path(directory) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        float_model = onnx.load(str(prepared))
        convolutions = _quantised_convolutions(float_model, scope)
        if rounding == "gptq":
            onnx.save(gptq.round_convolutions(float_model, convolutions, feeds), str(prepared))
        quantize_static(
            str(prepared),
            str(output),
            Windows(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=reduce_range,
            op_types_to_quantize=None if scope == "all" else ["Conv"],
            nodes_to_quantize=None if scope in ("all", "convolutions") else convolutions,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[method],
        )
    return output


def _quantised_convolutions(model: onnx.ModelProto, scope: str) -> list[str]:
    """The names of the Conv nodes of the activations in `scope` (their weights' names hold the stage's and block's
    names), never the FA channel's one-example map (`onnx_graph`: weights named `.fa.weight`), which is added to
    every example alike, so that its rounding would shift them all the same way. They are what the two stage-1 scopes
    quantise and what GPTQ rounds; "all" and "convolutions" leave the choice to ONNX Runtime, which quantises the FA
    channel's convolutions too, rounded to nearest."""
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1].endswith(".fa.weight"):
            continue
        leading = any(f".stage1.block{block}." in node.input[1] for block in LEADING_BLOCKS)
        if (
            scope in ("all", "convolutions")
            or (scope == "stage1_convolutions" and ".stage1." in node.input[1])
            or (scope == "stage1_leading_3x3" and leading and tuple(weights[node.input[1]].dims[2:]) == (3, 3))
        ):
            names.append(node.name)
    return names


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What an int8 copy is calibrated on: `key` names the data in the cache's file names, and `windows` computes the
    stored windows only when no copy of that name is cached yet (decoding the audio costs more than quantising)."""

    key: str
    windows: Callable[[], Sequence[np.ndarray]]


def cached_onnx(checkpoint: str, cache_dir: str | Path | None = None, calibration: Calibration | None = None) -> Path:
    """The float16-input ONNX model of a checkpoint, exported once and kept in `cache_dir` (default: the system's
    temporary folder) under a hash of the checkpoint's files and the export's format, so that tagging with it again
    does not export again. With `calibration`, its int8 copy (`quantize_onnx`), kept under a hash of the
    calibration's key too; making it is announced on stderr, as it takes a while."""
    root = Path(checkpoints.step_directory(checkpoint))  # a kind directory's latest step, as `load` reads it
    digest = hashlib.sha256(f"{SETTINGS_FORMAT} {GRAPH_FORMAT} opset {OPSET} {OUTPUT_NAME} {EMBEDDING_NAME}".encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "emorf_jax_onnx")
    output = cache / f"{digest.hexdigest()[:32]}.onnx"
    if not output.exists():
        partial = export_onnx(checkpoint, cache / f"{output.stem}.{os.getpid()}.part")
        os.replace(partial, output)  # whole or absent, whatever runs at the same time
    if calibration is None:
        return output
    from emorf_jax.export import gptq

    rounding = f"GPTQ {gptq.GRAM_WINDOWS} windows x {gptq.POSITIONS_PER_WINDOW}, damping {gptq.DAMPING}"
    digest.update(f"int8 {sorted(INT8_DEFAULT.items())} ({rounding}) calibrated on {calibration.key}".encode())
    quantized = cache / f"{digest.hexdigest()[:32]}.int8.onnx"
    if not quantized.exists():
        print(
            f"making the int8 copy of {checkpoint} (once: it is cached in {cache}; about a minute at the paper's "
            "width on two cores)",
            file=sys.stderr,
            flush=True,
        )
        partial = quantize_onnx(output, calibration.windows(), cache / f"{quantized.stem}.{os.getpid()}.part")
        os.replace(partial, quantized)
    return quantized
