"""VGG-ish, the organisers' MediaEval 2019 baseline, on OUR features (hop512, 256 bands), trained with the recipe of
every other row (configs/default.py: mixup, SWA, snapshots), so that only the model differs.

Follows Choi et al. 2016, "Automatic tagging using deep convolutional neural networks" (the fully convolutional
FCN) as narrowed in the task's baseline code: five 3x3 conv blocks of 64, 128, 128, 128, 64 channels with BN, ELU
and max-pools (2,4), (2,4), (2,4), (3,5), (4,4), dropout 0.5, a dense head (emorf_jax/models/vggish.py).
Parameters at 56 tags: 448,122 (any input size: what the pools leave is max-pooled globally).
UNVERIFIED: pools clipped and a global max over what remains (256 bands leave 2 rows; the organisers' 96 x 1,366
input leaves 1x1); the organisers' own training (100 epochs Adam 1e-4, then SGD, central 29-s crops) is not used.
Published (organisers, on their essentia96 features): PR-AUC-macro 0.107734.
"""

from configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    default.set_model(config, variant, "vggish", {None: 64, "demo": 16, "test": 4}, dropout=0.5)
    default.use_plain_bce(config)
    return config
