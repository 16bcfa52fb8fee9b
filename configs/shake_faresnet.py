"""Shake-Shake FA-ResNet, the paper's first run. Its details are UNVERIFIED: the authors published no code for it."""

from configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    config.model.frequency_aware = True
    config.model.shake_shake = True
    return config
