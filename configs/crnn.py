"""CRNN on the hop-1536 features, as in the paper's table: Choi et al. 2017, "Convolutional recurrent neural
networks for music classification" (four 3x3 conv blocks of 64, 128, 128, 128 channels with BN, ELU, max-pools
2x2, 3x3, 4x4, 4x4 and dropout 0.1; two GRU layers of 32 units over time; dropout 0.3; a dense head:
emorf_jax/models/crnn.py), with the recipe of every other row.

Parameters at 56 tags: 406,458 on 256 bands (394,170 on Choi's 96: the GRU's input is rows x channels).
Crops and windows of 861 frames (30 s, Choi's 29-s input: 8 GRU steps) at paper size; `:demo`/`:test` keep the
other rows' seconds (`default.use_hop1536`).
UNVERIFIED: the authors' CRNN code is not public (widths, dropout and GRU sizes follow Choi et al.'s published
model); the crop and window lengths.
Published (CP-JKU run 4_crnn): PR-AUC-macro 0.117181.

Run: `python -m emorf_jax.main --config=configs/crnn.py[:demo|:test] --workdir=runs/crnn`. Cost: (none) ESTIMATED under
1 h on one H200 GPU: 10.3 GFLOP forward per example (XLA's count), 0.31x the FA-ResNet's, ~13 min of configs/
default.py's ~41 min of steps, near the input pipeline's ~19 min for 256 x 861 crops (as configs/vggish.py); ~3 weeks
on 2 CPU cores, scaled the same way. `:demo` MEASURED 220 s on 2 idle CPU cores (2026-12-01,
`benchmarks.paper_table`, data made before) plus ~1 min making the data; `:test` ESTIMATED 1-2 min on 2 cores.
"""

from configs import default

CHOI_FRAMES = 861  # 30 s at 44.1 kHz / hop 1536


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    default.set_model(
        config,
        variant,
        "crnn",
        {None: 64, "demo": 16, "test": 4},
        gru_units={None: 32, "demo": 16, "test": 4}[variant or None],
        conv_dropout=0.1,
        dropout=0.3,
    )
    default.use_plain_bce(config)
    default.use_hop1536(config)
    if not variant:
        config.input.crop_frames = CHOI_FRAMES
        config.input.eval_window_frames = CHOI_FRAMES
    return config
