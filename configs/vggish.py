"""VGG-ish, the organisers' MediaEval 2019 baseline, on OUR features (hop512, 256 bands), trained with the recipe of
every other row (configs/default.py: mixup, SWA, snapshots), so that only the model differs.

Follows Choi et al. 2016, "Automatic tagging using deep convolutional neural networks" (the fully convolutional
FCN) as narrowed in the task's baseline code: five 3x3 conv blocks of 64, 128, 128, 128, 64 channels with BN, ELU
and max-pools (2,4), (2,4), (2,4), (3,5), (4,4), dropout 0.5, a dense head (emorf_jax/models/vggish.py).
Parameters at 56 tags: 448,122 (any input size: what the pools leave is max-pooled globally).
UNVERIFIED: pools clipped and a global max over what remains (256 bands leave 2 rows; the organisers' 96 x 1,366
input leaves 1x1); the organisers' own training (100 epochs Adam 1e-4, then SGD, central 29-s crops) is not used.
Published (organisers, on their essentia96 features): PR-AUC-macro 0.107734.

Run: `python -m emorf_jax.main --config=configs/vggish.py[:demo|:test] --workdir=runs/vggish`. Cost: (none) ESTIMATED
under 1 h on one H200 GPU: by XLA's FLOP count (5.5 GFLOP forward per example, 0.16x the FA-ResNet's) its steps take
~7 min of configs/default.py's ~41, so the input pipeline sets the pace (~19 min for the ~2.0 M examples at the 1,721
examples/s MEASURED on 2 read threads, 2 vCPU AMD EPYC, 2026-12-01); ~10 days on 2 CPU cores, scaled the same way.
`:demo` MEASURED 378 s on 2 idle CPU cores (2026-12-01, `benchmarks.paper_table`, data made before) plus ~1 min
making the data; `:test` ESTIMATED 1-2 min on 2 cores (configs/default.py).
"""

from configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    default.set_model(config, variant, "vggish", {None: 64, "demo": 16, "test": 4}, dropout=0.5)
    default.use_plain_bce(config)
    return config
