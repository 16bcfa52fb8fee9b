"""CP-ResNet models (plain, frequency-aware, Shake-Shake), receptive fields, import of the authors' weights; the
baselines of the paper's table (vggish, resnet, crnn) and the registry that builds any of them by name."""

import importlib
from types import ModuleType

from emorf_jax.models.cp_resnet import CPResNet, frequency_channel, shake_shake
from emorf_jax.models.torch_import import from_torch_state_dict, load_torch_checkpoint

__all__ = [
    "CPResNet",
    "frequency_channel",
    "from_torch_state_dict",
    "load_torch_checkpoint",
    "receptive_field",
    "shake_shake",
]


def __getattr__(name: str) -> ModuleType:
    """Import `receptive_field` on first use, so that `python -m emorf_jax.models.receptive_field` runs cleanly."""
    if name == "receptive_field":
        return importlib.import_module(f"{__name__}.receptive_field")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
