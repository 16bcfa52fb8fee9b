"""Import of the authors' PyTorch weights: logits equal a PyTorch CP-ResNet's (frequency roll included), round trip,
error messages; our kernel schedule equals the authors' table."""

import functools

import jax
import numpy as np
import pytest

from emorf_jax.models import CPResNet, from_torch_state_dict, load_torch_checkpoint, receptive_field
from emorf_jax.models.cp_resnet import block_names
from emorf_jax.models.torch_import import torch_name

torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch (pip install -e '.[test]')")
from tests import torch_reference  # noqa: E402  (imports torch itself)

NUM_CLASSES, RHO, BASE, IN_CHANNELS = 5, 7, 8, 2  # ρ=7: 3x3 convs in stage 2 as well
# Odd sizes, so that the stem's padding and the floor of every pool matter; content differs along both axes.
INPUT = (
    np.random.default_rng(0).normal(size=(3, IN_CHANNELS, 45, 39))
    + np.linspace(-1.0, 2.0, 45)[:, None]
    + np.linspace(0.0, 0.5, 39)
).astype(np.float32)


@functools.cache
def _reference(frequency_aware):
    """A randomised PyTorch model (weights and running statistics), its state_dict and its eval logits."""
    model = torch_reference.TorchCPResNet(NUM_CLASSES, RHO, BASE, frequency_aware, in_channels=IN_CHANNELS)
    torch_reference.randomise(model, seed=1 + frequency_aware)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(INPUT)).numpy()
    return model, torch_reference.state_dict_as_numpy(model), logits


def _flax_model(frequency_aware):
    return CPResNet(num_classes=NUM_CLASSES, rho=RHO, base_channels=BASE, frequency_aware=frequency_aware)


@functools.partial(jax.jit, static_argnames="model")
def _eval_logits(model, variables, nchw):
    return model.apply(variables, nchw.transpose(0, 2, 3, 1), train=False)


def _max_relative_error(state_dict, frequency_aware, inputs=INPUT):
    *_, expected = _reference(frequency_aware)
    model = _flax_model(frequency_aware)
    logits = np.asarray(_eval_logits(model, from_torch_state_dict(state_dict, model), inputs))
    return np.abs(logits - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("frequency_aware", [False, True])
def test_eval_logits_match_the_pytorch_model(frequency_aware):
    _, state_dict, expected = _reference(frequency_aware)
    assert np.abs(expected).max() > 0.1 and np.std(expected) > 0.1  # nothing trivially zero
    model = _flax_model(frequency_aware)
    logits = np.asarray(_eval_logits(model, from_torch_state_dict(state_dict, model), INPUT))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("rho", range(receptive_field.MAX_RHO + 1))
def test_kernel_schedule_equals_the_authors_table(rho):
    ours = dict(receptive_field.kernel_schedule(rho))
    for stage, (k1s, k2s) in torch_reference.authors_kernels(rho).items():
        for block, kernels in enumerate(zip(k1s, k2s), start=1):
            assert (ours[f"{stage}.block{block}.conv1"], ours[f"{stage}.block{block}.conv2"]) == kernels, (rho, stage)


def test_the_authors_table_has_no_schedule_outside_rho_0_to_22():
    """Their function takes any integer ρ; below 0 and above 22 it repeats the ends, so 0..22 (ours) is all of it."""
    table = {rho: torch_reference.authors_kernels(rho) for rho in range(-10, 40)}
    assert len({repr(kernels) for kernels in table.values()}) == receptive_field.MAX_RHO + 1 == 23
    assert all(table[rho] == table[0] for rho in range(-10, 0))
    assert all(table[rho] == table[22] for rho in range(23, 40))
    # The model_config of the authors' DCASE `configs/cp_resnet.json` (ρ = 7), as they list it.
    assert table[7] == {
        "stage1": ([3, 3, 3, 3], [1, 3, 3, 3]),
        "stage2": ([3, 1, 1, 1], [1, 1, 1, 1]),
        "stage3": ([1, 1, 1, 1], [1, 1, 1, 1]),
    }


@pytest.mark.parametrize("frequency_aware", [True, False])  # the authors' roll is in their FA-ResNet only
def test_frequency_roll_logits_match_the_pytorch_model_on_the_same_shifts(frequency_aware):
    model_torch, state_dict, unrolled = _reference(frequency_aware)
    model = _flax_model(frequency_aware).clone(features_shift=True)
    variables = from_torch_state_dict(state_dict, model)
    apply = jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))
    logits, state = apply(variables, INPUT.transpose(0, 2, 3, 1), rngs={"shift": jax.random.PRNGKey(3)})
    shifts = [int(state["intermediates"][f"stage{s}_block{b}"]["features_shift"][0]) for s, b in block_names()]
    # Rolls that move the maps: the blocks see 22, 11, 5, 5 and then 2 frequency rows of the 45-row input.
    rows = (22, 11, 5, 5) + (2,) * 8
    assert sum(shift % size != 0 for shift, size in zip(shifts, rows)) >= 6 and shifts[0] % 22
    with torch.no_grad():
        expected = model_torch(torch.from_numpy(INPUT), shifts).numpy()
    assert np.abs(expected - unrolled).max() > 0.1 * np.abs(unrolled).max()  # the roll changes the logits
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_the_comparison_is_sensitive_to_layout_mistakes():
    _, state_dict, _ = _reference(True)
    assert _max_relative_error(state_dict, True) < 1e-5
    # Frequency and time swapped in every kernel (a wrong transpose; kernels are square, so shapes still fit).
    swapped = {key: value.transpose(0, 1, 3, 2) if value.ndim == 4 else value for key, value in state_dict.items()}
    assert _max_relative_error(swapped, True) > 1e-2
    # The FA channel dropped: its input weights zeroed in the block convs.
    dropped = {key: value.copy() for key, value in state_dict.items()}
    for key, value in dropped.items():
        if key.startswith("stage") and ".conv" in key and "shortcut" not in key:
            value[:, -1] = 0.0
    assert _max_relative_error(dropped, True) > 1e-2
    # The frequency axis upside down (row 0 must be the lowest bin for the FA channel and the asymmetric input).
    assert _max_relative_error(state_dict, True, INPUT[:, :, ::-1].copy()) > 1e-2
    # A BN convention error: the running variance used as a standard deviation.
    as_std = {key: np.sqrt(value) if key.endswith("running_var") else value for key, value in state_dict.items()}
    assert _max_relative_error(as_std, True) > 1e-2


def test_training_mode_batch_statistics_and_momentum_match_pytorch():
    model_torch, state_dict, _ = _reference(True)
    model = _flax_model(True)
    variables = from_torch_state_dict(state_dict, model)
    trained = torch_reference.TorchCPResNet(NUM_CLASSES, RHO, BASE, True, in_channels=IN_CHANNELS)
    trained.load_state_dict(model_torch.state_dict())
    trained.train()
    with torch.no_grad():
        expected = trained(torch.from_numpy(INPUT)).numpy()
    logits, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, INPUT.transpose(0, 2, 3, 1)
    )
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    updated = trained.state_dict()
    for path, mean in jax.tree_util.tree_leaves_with_path(updates["batch_stats"]):
        key = torch_name(tuple(entry.key for entry in path))
        if key.endswith("running_mean"):  # PyTorch keeps an unbiased running variance, Flax a biased one
            np.testing.assert_allclose(mean, updated[key].numpy(), rtol=1e-4, atol=1e-5, err_msg=key)


def test_round_trip_through_a_pth_file(tmp_path):
    model_torch, state_dict, _ = _reference(False)
    assert any(key.endswith("num_batches_tracked") for key in state_dict)
    path = tmp_path / "cp_resnet.pth"
    torch.save({"state_dict": {f"module.{key}": value for key, value in model_torch.state_dict().items()}}, path)
    loaded = load_torch_checkpoint(path)
    assert set(loaded) == set(state_dict)
    variables = from_torch_state_dict(loaded, _flax_model(False))
    assert set(variables) == {"params", "batch_stats"}
    names = []
    for collection in variables.values():
        for path, leaf in jax.tree_util.tree_leaves_with_path(collection):
            key = torch_name(tuple(entry.key for entry in path))
            names.append(key)
            expected = state_dict[key].transpose(2, 3, 1, 0) if leaf.ndim == 4 else state_dict[key]
            np.testing.assert_array_equal(leaf, expected, err_msg=key)
    assert sorted(names) == sorted(key for key in state_dict if not key.endswith("num_batches_tracked"))
    assert "stage2.block1.shortcut.conv.weight" in names and "feed_forward.1.running_var" in names


def test_missing_unexpected_and_misshaped_keys_are_named():
    _, state_dict, _ = _reference(False)
    model = _flax_model(False)
    missing = {key: value for key, value in state_dict.items() if key != "stage2.block1.shortcut.bn.running_var"}
    with pytest.raises(ValueError, match=r"lacks 1 key\(s\).*stage2\.block1\.shortcut\.bn\.running_var"):
        from_torch_state_dict(missing, model)
    unexpected = {**state_dict, "stage1.block1.shortcut.conv.weight": np.zeros((8, 8, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r"does not use: stage1\.block1\.shortcut\.conv\.weight"):
        from_torch_state_dict(unexpected, model)
    misshaped = {**state_dict, "stage1.block2.conv1.weight": np.zeros((8, 8, 1, 1), np.float32)}
    with pytest.raises(
        ValueError,
        match=r"'stage1\.block2\.conv1\.weight'\] has shape \(8, 8, 1, 1\), the model "
        r"expects \(8, 8, 3, 3\)",
    ):
        from_torch_state_dict(misshaped, model)
    _, frequency_aware_state_dict, _ = _reference(True)
    with pytest.raises(ValueError, match=r"conv\d\.weight'\] has shape \(\d+, \d+, \d, \d\)"):
        from_torch_state_dict(frequency_aware_state_dict, model)  # FA weights into a plain CP-ResNet
    with pytest.raises(ValueError, match="no 'in_c.0.weight'"):
        from_torch_state_dict({k: v for k, v in state_dict.items() if k != "in_c.0.weight"}, model)
    with pytest.raises(ValueError, match=r"lacks \d+ key\(s\).*stage1\.block1\.branch1\.bn1\.running_mean"):
        from_torch_state_dict(state_dict, model.clone(shake_shake=True))  # a plain model's weights for Shake-Shake
