"""Flax CP-ResNet variables -> a state_dict in the authors' PyTorch names and layout, the inverse of torch_import.

Numpy only: writing the `.pt` file is the caller's (`emorf_jax.export`). Each BatchNorm also gets the
`num_batches_tracked` counter that PyTorch's BatchNorm2d keeps, so that `load_state_dict(strict=True)` accepts the
result; it is 0, since no PyTorch step has run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from emorf_jax.models.torch_import import TORCH_TO_FLAX_KERNEL, torch_name

_FLAX_TO_TORCH_KERNEL = tuple(np.argsort(TORCH_TO_FLAX_KERNEL))  # (kh, kw, in, out) -> (out, in, kh, kw)
_BATCH_COUNTER = "num_batches_tracked"


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{the authors' key: float32 array} of a CP-ResNet's Flax `variables` ({"params", "batch_stats"}), kernels
    transposed to PyTorch's (out, in, kh, kw), plus an int64 `num_batches_tracked` per BatchNorm."""
    state_dict: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(dict(variables[collection])).items():
            array = np.array(leaf, np.float32)  # a writable copy, as torch.from_numpy wants
            state_dict[torch_name(path)] = array.transpose(_FLAX_TO_TORCH_KERNEL) if array.ndim == 4 else array
            if path[-1] == "mean":  # one per BatchNorm
                state_dict[torch_name(path).replace("running_mean", _BATCH_COUNTER)] = np.zeros((), np.int64)
    return state_dict
