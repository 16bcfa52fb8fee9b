"""ResNet-18 (He et al. 2016, "Deep residual learning for image recognition": basic blocks [2, 2, 2, 2], widths
64-512, 7x7/2 stem and 3x3/2 max-pool, global average pooling, dense head) on a 1-channel hop512 spectrogram,
with the recipe of every other row (configs/default.py).
A row of benchmarks/paper_table.py: one of the slides' "deeper = better?" baselines, with no published figure.

Parameters at 56 tags: 11,198,968 (torchvision's count less the two input channels and the 1,000-class head).
UNVERIFIED: torchvision's Kaiming fan-out initialisation and stride placement (in the 3x3 conv).

Run: `python -m emorf_jax.main --config=configs/resnet18.py[:demo|:test] --workdir=runs/resnet18`. Cost: (none)
ESTIMATED ~45 min on one H200 GPU: 14.7 GFLOP forward per example (XLA's count), 0.44x the FA-ResNet's, ~18 min of
steps (configs/default.py's ~41 scaled; the input pipeline's pace, ~19 min, as configs/vggish.py), about doubled by
validation; ~4 weeks on 2 CPU cores, scaled the same way. `:demo` ESTIMATED 2-4 min on 2 CPU cores plus ~1 min making
the data (not timed alone; in the ρ sweep's baselines, MEASURED on 2 busy cores on 2026-12-05, docs/results.md,
ResNet-18 and ResNet-34 at two seeds each took the ~6 min left of 25 min by ResNet-50's 2 x 9.5); `:test` ESTIMATED
1-2 min on 2 cores.
"""

from configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    default.set_model(config, variant, "resnet18", {None: 64, "demo": 8, "test": 2})
    default.use_plain_bce(config)
    return config
