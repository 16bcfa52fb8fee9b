"""ResNet-50 (He et al. 2016, "Deep residual learning for image recognition": bottleneck blocks [3, 4, 6, 3] of
width 64-512 and 4x expansion, 7x7/2 stem, 3x3/2 max-pool, global average pooling, dense head) on a 1-channel hop512
spectrogram, with the recipe of every other row.
A row of benchmarks/paper_table.py: one of the slides' "deeper = better?" baselines, with no published figure.

Parameters at 56 tags: 23,616,504 (torchvision's count less the two input channels and the 1,000-class head).
UNVERIFIED: torchvision's layout (stride in the 3x3 conv) and Kaiming fan-out initialisation.
"""

from configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    default.set_model(config, variant, "resnet50", {None: 64, "demo": 8, "test": 2})
    default.use_plain_bce(config)
    return config
