"""ResNet-50 (He et al. 2016, "Deep residual learning for image recognition": bottleneck blocks [3, 4, 6, 3] of
width 64-512 and 4x expansion, 7x7/2 stem, 3x3/2 max-pool, global average pooling, dense head) on a 1-channel hop512
spectrogram, with the recipe of every other row.
A row of benchmarks/paper_table.py: one of the slides' "deeper = better?" baselines, with no published figure.

Parameters at 56 tags: 23,616,504 (torchvision's count less the two input channels and the 1,000-class head).
UNVERIFIED: torchvision's layout (stride in the 3x3 conv) and Kaiming fan-out initialisation.

Run: `python -m emorf_jax.main --config=configs/resnet50.py[:demo|:test] --workdir=runs/resnet50`. Cost: (none)
ESTIMATED ~1.5 h on one H200 GPU and ~2 months on 2 CPU cores: 34.9 GFLOP forward per example (XLA's count), 1.04x
the FA-ResNet's, so configs/default.py's estimates. `:demo` MEASURED ~9.5 min on 2 CPU cores at load 5-6, data made
before (2026-12-05, the ρ sweep's baseline, docs/results.md; less on an idle machine), plus ~1 min making the data;
`:test` ESTIMATED 1-2 min on 2 cores.
"""

from configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    default.set_model(config, variant, "resnet50", {None: 64, "demo": 8, "test": 2})
    default.use_plain_bce(config)
    return config
