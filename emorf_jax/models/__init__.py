"""CP-ResNet models (plain, frequency-aware, Shake-Shake), receptive fields, import of the authors' weights; the
baselines of the paper's table (vggish, resnet, crnn) and the registry that builds any of them by name."""

from emorf_jax.models import receptive_field
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
