"""CP-ResNet (ρ=5), the receptive-field-regularised ResNet without the frequency-aware channel."""

from configs import default


def get_config(variant: str | None = None):
    return default.get_config(variant)
