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
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from emorf_jax import checkpoints, split_predictions
from emorf_jax.models import registry
from emorf_jax.models.cp_resnet import MIN_INPUT_SIZE, CPResNet, block_names
from emorf_jax.models.torch_export import to_torch_state_dict

if TYPE_CHECKING:  # torch is optional: the [export] extra
    from emorf_jax.models.torch_cp_resnet import TorchCPResNet

FORMATS = ("torch", "onnx")
OPSET = 18  # the ONNX operator set of the exported graphs: onnxruntime >= 1.14 runs it
INPUT_NAME, OUTPUT_NAME, EMBEDDING_NAME = "spectrogram", "logits", "embedding"
INPUT_DTYPES = ("float16", "float32")
PRECISIONS = ("float32", "int8")
INT8_SCOPES = ("all", "convolutions", "stage1_convolutions")
INT8_METHODS = ("minmax", "percentile", "entropy")
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
    scope: str = "stage1_convolutions",
    method: str = "minmax",
    reduce_range: bool = False,
) -> Path:
    """An int8 copy of an exported model (ONNX Runtime's static QDQ quantisation: int8 weights per output channel,
    7-bit with `reduce_range`, and uint8 activations whose ranges `method` sets from `calibration`, stored windows
    (frames, *frame_shape) as the model's input takes them, one at a time). `scope` says what runs in int8: every
    operator ONNX Runtime quantises ("all"), every convolution, or the first stage's convolutions only, which hold
    86 % of the FLOPs at the paper's width; the rest stays float32. The default, first-stage convolutions with the
    minima and maxima as ranges, moved the tags least of the settings measured (benchmarks/RESULTS.md, "int8 that
    keeps the tags"); with "minmax" the calibration keeps only each tensor's extremes per window, so memory does not
    grow with their number."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError("int8 quantisation needs at least one calibration window")
    if scope not in INT8_SCOPES or method not in INT8_METHODS:
        raise ValueError(f"int8 scope {scope!r}, method {method!r}: use {INT8_SCOPES} and {INT8_METHODS}")

    class Windows(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            window = next(self.remaining, None)
            return None if window is None else {INPUT_NAME: np.asarray(window, np.float16)[None]}

    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="emorf_quantize_", dir=output.parent) as directory:
        prepared = Path(directory) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
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
            nodes_to_quantize=_stage1_convolutions(prepared) if scope == "stage1_convolutions" else None,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[method],
        )
    return output


def _stage1_convolutions(model: Path) -> list[str]:
    """The names of the first stage's convolutions of the activations (their weights' names hold the stage's name),
    not of the FA channel's one-example map (`onnx_graph`: weights named `.fa.weight`), which is added to every
    example alike, so that its rounding would shift them all the same way."""
    import onnx

    return [
        node.name
        for node in onnx.load(str(model)).graph.node
        if node.op_type == "Conv" and ".stage1." in node.input[1] and not node.input[1].endswith(".fa.weight")
    ]


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What an int8 copy is calibrated on: `key` names the data in the cache's file names, and `windows` computes the
    stored windows only when no copy of that name is cached yet (decoding the audio costs more than quantising)."""

    key: str
    windows: Callable[[], Sequence[np.ndarray]]


def cached_onnx(checkpoint: str, cache_dir: str | Path | None = None, calibration: Calibration | None = None) -> Path:
    """The float16-input ONNX model of a checkpoint, exported once and kept in `cache_dir` (default: the system's
    temporary folder) under a hash of the checkpoint's files and the export's format, so that tagging with it again
    does not export again. With `calibration`, its int8 copy (`quantize_onnx`),
    kept under a hash of the calibration's key too."""
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
    digest.update(b"int8 of the default setting, calibrated on " + calibration.key.encode())
    quantized = cache / f"{digest.hexdigest()[:32]}.int8.onnx"
    if not quantized.exists():
        partial = quantize_onnx(output, calibration.windows(), cache / f"{quantized.stem}.{os.getpid()}.part")
        os.replace(partial, quantized)
    return quantized
