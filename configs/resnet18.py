"""ResNet-18 (He et al. 2016, "Deep residual learning for image recognition": basic blocks [2, 2, 2, 2], widths
64-512, 7x7/2 stem and 3x3/2 max-pool, global average pooling, dense head) on a 1-channel hop512 spectrogram,
with the recipe of every other row (configs/default.py).
A row of benchmarks/paper_table.py: one of the slides' "deeper = better?" baselines, with no published figure.

Parameters at 56 tags: 11,198,968 (torchvision's count less the two input channels and the 1,000-class head).
UNVERIFIED: torchvision's Kaiming fan-out initialisation and stride placement (in the 3x3 conv).
"""

from configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    default.set_model(config, variant, "resnet18", {None: 64, "demo": 8, "test": 2})
    default.use_plain_bce(config)
    return config
