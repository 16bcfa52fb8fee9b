"""ResNet-34 on the hop-1536 features, as in the paper's table ("deeper is not better"): He et al. 2016, "Deep
residual learning for image recognition" (basic blocks [3, 4, 6, 3], widths 64-512, 7x7/2 stem, 3x3/2 max-pool,
global average pooling, dense head) on a 1-channel spectrogram, with the recipe of every other row.

Parameters at 56 tags: 21,307,128 (torchvision's count less the two input channels and the 1,000-class head).
UNVERIFIED: the authors' ResNet-34 code is not public (torchvision's layout and initialisation here); crops and
windows of the same seconds as the other rows (`default.use_hop1536`).
Published (CP-JKU run 5_resnet34): PR-AUC-macro 0.102063.

Run: `python -m emorf_jax.main --config=configs/resnet34.py[:demo|:test] --workdir=runs/resnet34`. Cost: (none)
ESTIMATED ~30 min on one H200 GPU: 9.9 GFLOP forward per 287-frame example (XLA's count), 0.29x the FA-ResNet's,
~12 min of configs/default.py's ~41 min of steps, about doubled by validation (its crops are a third of the bytes of
those the input pipeline was measured on); ~3 weeks on 2 CPU cores, scaled the same way. `:demo` MEASURED 178 s on 2
idle CPU cores, its hop1536 shards included (2026-12-01, `benchmarks.paper_table`), plus ~1 min making the data;
`:test` ESTIMATED 1-2 min on 2 cores.
"""

from configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    default.set_model(config, variant, "resnet34", {None: 64, "demo": 8, "test": 2})
    default.use_plain_bce(config)
    default.use_hop1536(config)
    return config
