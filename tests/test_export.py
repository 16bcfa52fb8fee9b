"""Export of checkpoints (`emorf_jax.export`): the torch state_dict round-trips and gives our logits in the PyTorch
reference (tests/torch_reference.py, written independently) and in the package's PyTorch definition; the ONNX
model, written without torch, gives our logits and embeddings in onnxruntime from stored windows for every member of
the CP-ResNet family, two lengths, two batch sizes and both input dtypes, carries the tags, and is exported and run
where torch cannot be imported; the command's usage errors exit 2 with a message."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from data_prep import features
from emorf_jax import checkpoints, export, split_predictions
from emorf_jax.export import __main__ as export_command
from emorf_jax.export import gptq
from emorf_jax.models import from_torch_state_dict, registry
from emorf_jax.models.cp_resnet import MAX_RHO, MIN_INPUT_SIZE

try:  # the torch format only: the ONNX tests run without torch
    import torch

    from tests import torch_reference
except ImportError:
    torch = torch_reference = None
needs_torch = pytest.mark.skipif(torch is None, reason="the torch format needs torch (pip install -e '.[test]')")

NUM_TAGS, BASE, RHO = 7, 4, 5
SETTINGS = features.settings_for("hop512")  # 256 mel bands: real input sizes
WINDOW = 1722  # the 20-s evaluation window at the paper's settings
TRACK = 25_840  # a whole 5-minute track in one pass
MODELS = {
    "cp_resnet": {"frequency_aware": False, "shake_shake": False, "features_shift": False},
    "fa_resnet": {"frequency_aware": True, "shake_shake": False, "features_shift": False},
    "shake_fa_resnet": {"frequency_aware": True, "shake_shake": True, "features_shift": False},
    "fa_resnet_rolled": {"frequency_aware": True, "shake_shake": False, "features_shift": True},
}
# Beyond the four above: any rho and width, and every option at once with stereo input (two input channels).
ONNX_MODELS = {
    **{name: {**variant, "rho": RHO, "base_channels": BASE} for name, variant in MODELS.items()},
    "cp_resnet_rho0": {**MODELS["cp_resnet"], "rho": 0, "base_channels": 3},
    "shake_fa_resnet_rolled_stereo": {
        "frequency_aware": True,
        "shake_shake": True,
        "features_shift": True,
        "rho": MAX_RHO,
        "base_channels": 2,
        "stereo": True,
    },
}
_jitted_logits = jax.jit(split_predictions.logits_step, static_argnames="model")
_jitted_window_outputs = jax.jit(split_predictions.window_outputs, static_argnames="model")


def _meta(fields: dict, channels: int = 1) -> dict:
    rng = np.random.default_rng(1)
    shape = (SETTINGS.n_mels,) if channels == 1 else (channels, SETTINGS.n_mels)
    return {
        "kind": "swa",
        "step": 3,
        "model": fields,
        "tags": [f"mood/theme---tag{k}" for k in range(NUM_TAGS)],
        "features": dataclasses.asdict(SETTINGS),
        "normalisation": {
            "mean": rng.normal(-30.0, 5.0, shape).tolist(),
            "std": rng.uniform(10.0, 20.0, shape).tolist(),
        },
        "window_frames": WINDOW,
    }


def _random_variables(model, seed: int, channels: int = 1) -> dict:
    """Random weights AND running statistics (the head is zero-initialised), so no comparison passes through zeros:
    kernels N(0, 1/fan_in), BatchNorm scales, biases, means and variances uniform around their usual values."""
    variables = model.init(
        {"params": jax.random.PRNGKey(seed), "shift": jax.random.PRNGKey(0)},
        np.zeros((1, SETTINGS.n_mels, 64, channels), np.float32),
    )
    rng = np.random.default_rng(seed)
    ranges = {"scale": (0.5, 1.5), "bias": (-0.5, 0.5), "mean": (-0.5, 0.5), "var": (0.5, 2.0)}

    def randomise(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0.0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape).astype(np.float32)
        return rng.uniform(*ranges[name], leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(randomise, variables)


def _save(directory, fields: dict, seed: int, channels: int = 1) -> str:
    model = registry.build(fields)
    with checkpoints.open_manager(str(directory), checkpoints.SWA) as manager:
        checkpoints.save(manager, 3, _random_variables(model, seed, channels), _meta(fields, channels))
    return str(directory / checkpoints.SWA)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """{name: a checkpoint directory} of the four CP-ResNet variants at a tiny width."""
    fields = {"name": "cp_resnet", "num_classes": NUM_TAGS, "rho": RHO, "base_channels": BASE}
    return {
        name: _save(tmp_path_factory.mktemp(name), {**fields, **variant}, seed)
        for seed, (name, variant) in enumerate(MODELS.items())
    }


def _stored_windows(batch: int, frames: int, seed: int, channels: int = 1) -> np.ndarray:
    """Windows as the shards store them: time-major float16 dB-like values, content varying along both axes; stereo
    (batch, frames, channels, n_mels) for `channels` 2."""
    rng = np.random.default_rng(seed)
    frame = (SETTINGS.n_mels,) if channels == 1 else (channels, SETTINGS.n_mels)
    values = rng.normal(-30.0, 15.0, (batch, frames, *frame)) + np.linspace(-10, 10, SETTINGS.n_mels)
    return values.astype(np.float16)


def _our_logits(checkpoint: str, stored: np.ndarray) -> np.ndarray:
    variables, meta = checkpoints.load_checkpoint(checkpoint)
    norm = meta["normalisation"]
    mean, std = np.asarray(norm["mean"], np.float32), np.asarray(norm["std"], np.float32)
    return np.asarray(_jitted_logits(variables, stored, mean, std, model=registry.build(meta["model"])))


def _nchw(checkpoint: str, stored: np.ndarray) -> torch.Tensor:
    """The stored windows normalised and in the authors' NCHW layout, computed apart from the package."""
    _, meta = checkpoints.load_checkpoint(checkpoint)
    mean, std = np.asarray(meta["normalisation"]["mean"]), np.asarray(meta["normalisation"]["std"])
    normalised = (stored.astype(np.float32) - mean) / std
    return torch.from_numpy(normalised.transpose(0, 2, 1)[:, None].astype(np.float32))


def _assert_close(logits: np.ndarray, expected: np.ndarray) -> None:
    assert np.std(expected) > 0.1  # nothing trivially constant
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _torch_export(checkpoint: str, directory: str) -> tuple[dict, dict]:
    """(state_dict as torch loads it, settings) of a checkpoint exported through the command."""
    output = f"{directory}/model.pt"
    assert export_command.main(["--checkpoint", checkpoint, "--format", "torch", "--output", output]) == 0
    with open(f"{directory}/model.json") as f:
        return torch.load(output, weights_only=True), json.load(f)


@needs_torch
@pytest.mark.parametrize("name", MODELS)
def test_torch_round_trip_gives_identical_weights_and_the_settings(saved, name, tmp_path):
    state_dict, settings = _torch_export(saved[name], str(tmp_path))
    variables, meta = checkpoints.load_checkpoint(saved[name])
    model = registry.build(meta["model"])
    imported = from_torch_state_dict({key: value.numpy() for key, value in state_dict.items()}, model)
    flat, imported_flat = jax.tree_util.tree_leaves_with_path(variables), jax.tree_util.tree_leaves(imported)
    assert len(flat) == len(imported_flat) and jax.tree.structure(variables) == jax.tree.structure(imported)
    for (path, leaf), back in zip(flat, imported_flat):
        np.testing.assert_array_equal(np.asarray(back), np.asarray(leaf), err_msg=jax.tree_util.keystr(path))
    assert state_dict["in_c.0.weight"].shape == (BASE, 1, 5, 5)  # PyTorch's (out, in, kh, kw)
    assert settings["tags"] == meta["tags"] and settings["normalisation"] == meta["normalisation"]
    assert settings["features"] == meta["features"] and settings["window_frames"] == WINDOW
    assert settings["model"] == meta["model"]
    shifts = settings["torch_model"]["shifts"]
    assert (shifts is not None) == MODELS[name]["features_shift"]
    if shifts is not None:
        assert len(shifts) == 12 and len(set(shifts)) > 3 and all(-50 <= shift <= 50 for shift in shifts)


@needs_torch
@pytest.mark.parametrize("name", MODELS)
def test_the_pytorch_reference_and_the_package_model_give_our_logits(saved, name, tmp_path):
    state_dict, settings = _torch_export(saved[name], str(tmp_path))
    arguments = settings["torch_model"]
    reference = torch_reference.TorchCPResNet(
        NUM_TAGS, RHO, BASE, arguments["frequency_aware"], shake_shake=arguments["shake_shake"]
    )
    reference.load_state_dict(state_dict)  # strict: every name and shape the authors' layout has, no other
    reference.eval()
    package = export.torch_model(settings, state_dict)
    stored = _stored_windows(2, 431, seed=3)  # 10 s
    expected = _our_logits(saved[name], stored)
    with torch.no_grad():
        inputs = _nchw(saved[name], stored)
        _assert_close(reference(inputs, arguments["shifts"]).numpy(), expected)
        _assert_close(package(inputs).numpy(), expected)
    if arguments["shifts"] is not None:  # the roll matters: without it the logits differ
        with torch.no_grad():
            unrolled = reference(inputs).numpy()
        assert np.abs(unrolled - expected).max() > 1e-2 * np.abs(expected).max()


@pytest.mark.parametrize(("name", "input_dtype"), [("fa_resnet", "float16"), ("shake_fa_resnet", "float32")])
def test_onnxruntime_gives_our_logits_for_a_window_and_a_whole_track(saved, name, input_dtype, tmp_path):
    output = tmp_path / "model.onnx"
    arguments = ["--checkpoint", saved[name], "--format", "onnx", "--output", str(output)]
    assert export_command.main([*arguments, "--input_dtype", input_dtype]) == 0
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    (spectrogram,) = session.get_inputs()
    assert spectrogram.shape == ["batch", "frames", SETTINGS.n_mels]
    assert spectrogram.type == f"tensor({input_dtype.replace('32', '')})"
    assert [output.name for output in session.get_outputs()] == [export.OUTPUT_NAME, export.EMBEDDING_NAME]
    for batch, frames in ((3, WINDOW), (1, TRACK)):  # two batch sizes, two lengths: both axes dynamic
        stored = _stored_windows(batch, frames, seed=frames)
        logits, embedding = session.run(None, {export.INPUT_NAME: stored.astype(input_dtype)})
        assert logits.shape == (batch, NUM_TAGS) and len(embedding) == batch
        _assert_close(logits, _our_logits(saved[name], stored))


@pytest.fixture(scope="module")
def saved_for_onnx(tmp_path_factory) -> dict[str, str]:
    """{name: a checkpoint directory} of every model of `ONNX_MODELS`."""
    saved = {}
    for seed, (name, variant) in enumerate(ONNX_MODELS.items()):
        fields = {"name": "cp_resnet", "num_classes": NUM_TAGS, **variant}
        channels = 2 if fields.pop("stereo", False) else 1
        saved[name] = _save(tmp_path_factory.mktemp(name), fields, seed, channels)
    return saved


@pytest.mark.parametrize("name", ONNX_MODELS)
def test_the_onnx_graph_gives_the_logits_and_embeddings_of_jax(saved_for_onnx, name, tmp_path):
    """Every family member, each input dtype, a whole window in a batch of 3 and the shortest clip alone: the logits
    within 1e-4 of `split_predictions.window_outputs`, the embeddings (batch, 4 x base_channels) as close."""
    variables, meta = checkpoints.load_checkpoint(saved_for_onnx[name])
    model = registry.build(meta["model"])
    mean, std = (np.asarray(meta["normalisation"][key], np.float32) for key in ("mean", "std"))
    sessions = {
        dtype: ort.InferenceSession(
            str(export.export_onnx(saved_for_onnx[name], tmp_path / f"{dtype}.onnx", dtype)),
            providers=["CPUExecutionProvider"],
        )
        for dtype in export.INPUT_DTYPES
    }
    for batch, frames in ((3, WINDOW), (1, MIN_INPUT_SIZE)):
        stored = _stored_windows(batch, frames, seed=frames, channels=mean.ndim)
        logits, embedding = (
            np.asarray(out) for out in _jitted_window_outputs(variables, stored, mean, std, model=model)
        )
        assert np.std(logits) > 0.1 and embedding.shape == (batch, 4 * model.base_channels)
        for dtype, session in sessions.items():
            onnx_logits, onnx_embedding = session.run(None, {export.INPUT_NAME: stored.astype(dtype)})
            np.testing.assert_allclose(onnx_logits, logits, rtol=0, atol=1e-4, err_msg=f"{dtype} {batch}x{frames}")
            np.testing.assert_allclose(
                onnx_embedding, embedding, rtol=1e-5, atol=1e-4, err_msg=f"{dtype} {batch}x{frames}"
            )


def test_the_onnx_model_is_exported_and_run_where_torch_cannot_be_imported(saved, tmp_path):
    """The plain install's path: `export.cached_onnx` and onnxruntime with every `import torch` failing."""
    stored = _stored_windows(2, 200, seed=4)
    np.save(tmp_path / "stored.npy", stored)
    script = f"""
import sys
sys.modules["torch"] = None  # its import then raises ImportError
import numpy as np, onnxruntime
from emorf_jax import export
model = export.cached_onnx({saved["fa_resnet_rolled"]!r}, {str(tmp_path / "cache")!r})
session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
logits, _ = session.run(None, {{export.INPUT_NAME: np.load({str(tmp_path / "stored.npy")!r})}})
np.save({str(tmp_path / "logits.npy")!r}, logits)
assert sys.modules["torch"] is None
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    expected = _our_logits(saved["fa_resnet_rolled"], stored)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, rtol=0, atol=1e-4)
    assert len(list((tmp_path / "cache").glob("*.onnx"))) == 1


def test_the_onnx_metadata_holds_the_tags_features_and_window(saved, tmp_path):
    output = export.export_onnx(saved["fa_resnet_rolled"], tmp_path / "model.onnx")
    model = onnx.load(str(output))
    assert [entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")] == [export.OPSET]
    props = {entry.key: json.loads(entry.value) for entry in model.metadata_props}  # every value is JSON
    meta = _meta(MODELS["fa_resnet_rolled"])
    assert props["tags"] == meta["tags"] and props["features"] == meta["features"]
    assert props["window_frames"] == WINDOW and props["normalisation"] == meta["normalisation"]
    assert "float16 (batch, frames, n_mels)" in props["input"] and props["description"].startswith("FA-ResNet")
    assert len(props["torch_model"]["shifts"]) == 12
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["tags"]) == meta["tags"]


def _usage_error(capsys, *arguments: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        export_command.main(list(arguments))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_the_command_refuses_an_unknown_format_a_baseline_and_a_missing_checkpoint(saved, capsys, tmp_path):
    error = _usage_error(capsys, "--checkpoint", saved["fa_resnet"], "--format", "tflite", "--output", "x")
    assert "invalid choice: 'tflite'" in error and "torch" in error and "onnx" in error
    vggish = _save(tmp_path / "vggish", {"name": "vggish", "num_classes": NUM_TAGS, "base_channels": 4}, seed=9)
    for format_ in export.FORMATS:
        error = _usage_error(capsys, "--checkpoint", vggish, "--format", format_, "--output", str(tmp_path / "x"))
        assert "holds a VGG-ish" in error and "only CP-ResNet, FA-ResNet and Shake-Shake FA-ResNet" in error
    missing = str(tmp_path / "no_such_run" / "swa")
    error = _usage_error(capsys, "--checkpoint", missing, "--format", "torch", "--output", str(tmp_path / "x.pt"))
    assert f"no checkpoint directory at {missing}" in error
    assert not list(tmp_path.glob("x*"))  # nothing written


def test_the_int8_model_is_quantised_close_to_the_float_one_and_cached_per_calibration(saved, tmp_path, capsys):
    """int8 weights per channel and uint8 activations (QDQ) in the 3x3 convolutions of the activations of stage 1's
    first two blocks alone (`quantize_onnx`'s default), their weights as GPTQ rounds them, logits within a few
    percent of the float model's on windows it was not calibrated on; one quantisation per (checkpoint, calibration
    key), whose windows are computed only when it is not cached."""
    computed = []

    def windows(count: int):
        computed.append(count)
        return list(_stored_windows(count, 400, seed=5))

    quantised = export.cached_onnx(saved["fa_resnet"], tmp_path, export.Calibration("four", lambda: windows(4)))
    assert quantised.name.endswith(".int8.onnx") and quantised.parent == tmp_path and computed == [4]
    assert f"making the int8 copy of {saved['fa_resnet']} (once: it is cached in {tmp_path}" in capsys.readouterr().err
    graph = onnx.load(str(quantised)).graph
    operators = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= operators
    int8_weights = {t.name: t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4}
    leading = [f"cp_resnet.stage1.block{b}.conv{c}.weight" for b, c in ((1, 1), (2, 1), (2, 2))]
    # Not block 1's 1x1 conv2, nor the later blocks, the later stages or the FA channel's convolutions.
    assert set(int8_weights) == {f"{name}_quantized" for name in leading}
    float_model = onnx.load(str(export.cached_onnx(saved["fa_resnet"], tmp_path)))
    feeds = [{export.INPUT_NAME: window[None]} for window in _stored_windows(4, 400, seed=5)]  # the calibration's
    names = [node.name for node in float_model.graph.node if node.op_type == "Conv" and node.input[1] in leading]
    rounded = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in gptq.round_convolutions(float_model, names, feeds).graph.initializer
    }
    for name in leading:  # ONNX Runtime stores GPTQ's levels exactly
        levels = (
            rounded[name] / (np.abs(rounded[name]).reshape(len(rounded[name]), -1).max(1) / 127)[:, None, None, None]
        )
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(int8_weights[f"{name}_quantized"]), np.round(levels))
    stored = _stored_windows(2, 500, seed=6)
    float_session, int8_session = (
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for path in (export.cached_onnx(saved["fa_resnet"], tmp_path), quantised)
    )
    expected = float_session.run(None, {export.INPUT_NAME: stored})[0]
    logits = int8_session.run(None, {export.INPUT_NAME: stored})[0]
    assert np.std(expected) > 0.1 and not np.array_equal(logits, expected)
    assert np.abs(logits - expected).max() < 0.1 * np.abs(expected).max()
    again = export.cached_onnx(saved["fa_resnet"], tmp_path, export.Calibration("four", lambda: windows(4)))
    assert again == quantised and computed == [4]  # read from the cache: no windows computed, nothing quantised
    assert "int8 copy" not in capsys.readouterr().err
    other = export.cached_onnx(saved["fa_resnet"], tmp_path, export.Calibration("two", lambda: windows(2)))
    assert other != quantised and other.exists() and computed == [4, 2]
    with pytest.raises(ValueError, match="at least one calibration window"):
        export.quantize_onnx(quantised, [], tmp_path / "none.onnx")


@pytest.mark.parametrize(("kernel", "stride", "pads"), [((3, 3), 1, 1), ((5, 5), 2, 1), ((1, 1), 1, 0)])
def test_gptq_rounds_a_convolutions_weights_to_int8_steps_that_change_its_outputs_less_than_nearest(
    kernel, stride, pads
):
    """The unfolded inputs are what the Conv multiplies (its outputs from ONNX Runtime, every position); the rounded
    weights are ONNX Runtime's int8 steps (max |w| / 127 per output channel, the largest at +-127), and on those
    inputs their outputs' error is below that of rounding each weight to the nearest step (well below for a kernel
    wider than 1x1)."""
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(1, 16, 14, 41)).astype(np.float32)
    # ReLU-like: a positive mean, correlated along time and across channels, as feature maps are
    inputs = np.maximum(noise + np.roll(noise, 1, axis=3) + noise[:, :1] + 0.5, 0.0)
    weights = rng.normal(size=(8, 16, *kernel)).astype(np.float32)
    node = onnx.helper.make_node(
        "Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), strides=[stride] * 2, pads=[pads] * 4
    )
    graph = onnx.helper.make_graph(
        [node],
        "conv",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, inputs.shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weights, "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", export.OPSET)])
    outputs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": inputs}
    )[0]
    unfolded = gptq.unfolded_inputs(inputs, node, 10**6, rng).astype(np.float64)  # every position, in order
    np.testing.assert_allclose(weights.reshape(8, -1) @ unfolded, outputs.reshape(8, -1), atol=1e-4)

    rounded = gptq.rounded_weights(weights, unfolded @ unfolded.T)
    steps = np.abs(weights).reshape(8, -1).max(1) / gptq.INT8_STEPS
    levels = rounded.reshape(8, -1) / steps[:, None]
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    np.testing.assert_array_equal(np.abs(np.round(levels)).max(1), gptq.INT8_STEPS)
    nearest = np.round(weights.reshape(8, -1) / steps[:, None]) * steps[:, None]

    def output_error(candidate: np.ndarray) -> float:
        return float(np.linalg.norm((candidate.reshape(8, -1) - weights.reshape(8, -1)) @ unfolded))

    # Neighbouring taps of a wider kernel see correlated inputs, which the compensation uses most.
    assert output_error(rounded) < (0.8 if np.prod(kernel) > 1 else 1.0) * output_error(nearest)
