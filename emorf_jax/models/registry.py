"""Every model by name: a config's `model.name` and a checkpoint's `meta["model"]["name"]` pick the module here.

The fields of a model (`train.model_fields`) are its name plus the module's constructor arguments, so a
checkpoint rebuilds its model without the training config. Fields without a name (checkpoints written before the
baselines existed) describe a CP-ResNet.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from emorf_jax.models.cp_resnet import CPResNet
from emorf_jax.models.crnn import CRNN
from emorf_jax.models.resnet import BOTTLENECK, STAGE_SIZES, ResNet
from emorf_jax.models.vggish import VGGish

DEFAULT_MODEL = "cp_resnet"
MODELS: dict[str, Callable[..., nn.Module]] = {
    "cp_resnet": CPResNet,
    "vggish": VGGish,
    **{
        name: functools.partial(ResNet, stage_sizes=STAGE_SIZES[name], bottleneck=BOTTLENECK[name])
        for name in STAGE_SIZES
    },
    "crnn": CRNN,
}
DISPLAY_NAMES = {
    "vggish": "VGG-ish (organisers' baseline)",
    "resnet18": "ResNet-18",
    "resnet34": "ResNet-34",
    "resnet50": "ResNet-50",
    "crnn": "CRNN",
}


def model_name(fields: Mapping[str, Any]) -> str:
    return fields.get("name", DEFAULT_MODEL)


def build(fields: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """The module `fields` describe (name and constructor arguments), with `overrides` such as dtype."""
    arguments = dict(fields)
    name = arguments.pop("name", DEFAULT_MODEL)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](**arguments, **overrides)


def describe(fields: Mapping[str, Any]) -> str:
    """One line naming the model and its fields, e.g. for a model card."""
    name = model_name(fields)
    if name == "cp_resnet":
        kind = (
            "Shake-Shake FA-ResNet"
            if fields["shake_shake"]
            else "FA-ResNet"
            if fields["frequency_aware"]
            else "CP-ResNet"
        )
        roll = " with frequency roll" if fields["features_shift"] else ""
        return (
            f"{kind}{roll}, rho={fields['rho']}, base_channels={fields['base_channels']}, {fields['num_classes']} tags"
        )
    settings = ", ".join(f"{key}={value}" for key, value in fields.items() if key not in ("name", "num_classes"))
    return f"{DISPLAY_NAMES[name]}, {settings}, {fields['num_classes']} tags"
