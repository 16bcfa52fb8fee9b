"""Import of the authors' PyTorch CP-ResNet weights (cpjku_dcase19/20 `cp_resnet.py`, `cp_faresnet.py`) into Flax.

The importer works on numpy arrays, so torch is needed only to read a `.pth` file (`load_torch_checkpoint`).
PyTorch convs are (out, in, kh, kw) over NCHW with H = frequency; Flax convs are (kh, kw, in, out) over NHWC with
H = frequency, so a kernel is a transpose. In FA blocks the extra channel is the last input channel in both.
The authors published no Shake-Shake model; its two branches are named as ours, `stageS.blockB.branch1.conv1`, the
names `torch_export` writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from emorf_jax.models.cp_resnet import CPResNet

# Flax module name -> the authors' module path; the block modules "stageS_blockB" become "stageS.blockB".
_MODULE_NAMES = {
    "in_c_conv": "in_c.0",
    "in_c_bn": "in_c.1",
    "feed_forward_conv": "feed_forward.0",
    "feed_forward_bn": "feed_forward.1",
    "shortcut_conv": "shortcut.conv",
    "shortcut_bn": "shortcut.bn",
}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_IGNORED_SUFFIX = "num_batches_tracked"
TORCH_TO_FLAX_KERNEL = (2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
_STEM_KEY = "in_c.0.weight"


def torch_name(flax_path: tuple[str, ...]) -> str:
    """The authors' state_dict key of a Flax variable path, e.g. ("stage2_block1", "shortcut_conv", "kernel")
    -> "stage2.block1.shortcut.conv.weight"."""
    *modules, leaf = flax_path
    parts = [_MODULE_NAMES.get(module, module.replace("_", ".")) for module in modules]
    return ".".join([*parts, _LEAF_NAMES[leaf]])


def _template(model: CPResNet, in_channels: int) -> dict[str, Any]:
    """Shapes of the model's variables for `in_channels` input channels, without computing anything."""
    dummy = jnp.zeros((1, 64, 64, in_channels), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy, train=False))


def _convert(key: str, value: Any, flax_shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    is_kernel = len(flax_shape) == 4
    expected = tuple(flax_shape[axis] for axis in np.argsort(TORCH_TO_FLAX_KERNEL)) if is_kernel else flax_shape
    if array.shape != expected:
        raise ValueError(f"state_dict[{key!r}] has shape {array.shape}, the model expects {expected}")
    return array.transpose(TORCH_TO_FLAX_KERNEL) if is_kernel else array


def from_torch_state_dict(state_dict: Mapping[str, Any], model: CPResNet) -> dict[str, Any]:
    """Flax `variables` ({"params", "batch_stats"}) for `model` from the authors' state_dict (name -> array).

    The input channel count is read from the stem weight. `num_batches_tracked` entries are ignored; a missing,
    unexpected or mis-shaped key raises ValueError naming it.
    """
    if _STEM_KEY not in state_dict:
        raise ValueError(f"state_dict has no {_STEM_KEY!r} (the stem conv): is this a CP-ResNet state_dict?")
    stem_shape = np.shape(state_dict[_STEM_KEY])
    if len(stem_shape) != 4:
        raise ValueError(f"state_dict[{_STEM_KEY!r}] has shape {stem_shape}, expected (out, in, 5, 5)")
    template = _template(model, in_channels=stem_shape[1])

    given = {key for key in state_dict if not key.endswith(_IGNORED_SUFFIX)}
    variables: dict[str, Any] = {}
    for collection, tree in template.items():
        flat = traverse_util.flatten_dict(tree)
        names = {path: torch_name(path) for path in flat}
        missing = sorted(name for name in names.values() if name not in given)
        if missing:
            raise ValueError(f"state_dict lacks {len(missing)} key(s) the model needs: {', '.join(missing)}")
        given -= set(names.values())
        variables[collection] = traverse_util.unflatten_dict(
            {
                path: jnp.asarray(_convert(names[path], state_dict[names[path]], leaf.shape))
                for path, leaf in flat.items()
            }
        )
    if given:
        raise ValueError(f"state_dict has {len(given)} key(s) the model does not use: {', '.join(sorted(given))}")
    return variables


def arrays_by_flax_path(
    state_dict: Mapping[str, Any], paths: list[tuple[str, ...]]
) -> tuple[dict[tuple[str, ...], np.ndarray], dict[str, np.ndarray]]:
    """A loose reading of the authors' state_dict, for a model it may not fit (fine-tuning compares the shapes):
    ({Flax path: array} for each of `paths` (collection first, e.g. ("params", "in_c_conv", "kernel")) whose key the
    state_dict holds, kernels in Flax's layout; {key: array} of the keys no path names, `num_batches_tracked` left
    out)."""
    by_key = {torch_name(path[1:]): path for path in paths}
    found, other = {}, {}
    for key, value in state_dict.items():
        array = np.asarray(value, dtype=np.float32)
        if key in by_key:
            found[by_key[key]] = array.transpose(TORCH_TO_FLAX_KERNEL) if array.ndim == 4 else array
        elif not key.endswith(_IGNORED_SUFFIX):
            other[key] = array
    return found, other


def load_torch_checkpoint(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A `.pth` file's state_dict as name -> numpy array. Accepts a bare state_dict or a dict holding one under
    "state_dict"/"model", and strips the "module." prefix that DataParallel adds. Needs the `torch` extra."""
    try:
        import torch  # optional dependency, only for reading .pth files
    except ImportError as error:
        raise ImportError("reading a .pth checkpoint needs torch: pip install 'emorf_jax[torch]'") from error
    checkpoint = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    for wrapper_key in ("state_dict", "model"):
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper_key), Mapping):
            checkpoint = checkpoint[wrapper_key]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict")
    return {key.removeprefix("module."): tensor.detach().cpu().numpy() for key, tensor in checkpoint.items()}
