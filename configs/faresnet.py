"""FA-ResNet: CP-ResNet (ρ=5) with the frequency-aware channel, the paper's second run."""

from configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    config.model.frequency_aware = True
    return config
