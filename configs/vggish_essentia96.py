"""VGG-ish on the organisers' own input: their precomputed Essentia mel-spectrograms (`essentia96`: 12 kHz, hop 256,
96 bands, `python -m data_prep.build --features essentia96` over their `NN/ID.npy` files), the baseline row of the
paper's table, with the recipe of every other row (configs/default.py).

Model as configs/vggish.py (Choi et al. 2016 as narrowed in the task's baseline code); 448,122 parameters at 56
tags. Crops of 1,366 frames (29.1 s), the organisers' input length, on which the pools end at 1x1 as theirs do.
UNVERIFIED: whole-track windows of 1,366 frames (the organisers scored the central 1,366 frames only).
The synthetic MTG-Jamendo of `:demo` has MP3s only: for it, `python -m emorf_jax.main` first writes `.npy` files in
the organisers' format from them (`data_prep.essentia_like`: librosa's mels, not Essentia's) and prepares those.

Run: `python -m emorf_jax.main --config=configs/vggish_essentia96.py[:demo|:test] --workdir=runs/vggish_essentia96`.
Cost: (none) ESTIMATED under 1 h on one H200 GPU: 3.3 GFLOP forward per example (XLA's count), 0.10x the
FA-ResNet's, ~4 min of configs/default.py's ~41 min of steps, so reading the crops, not the GPU, sets the pace (as
configs/vggish.py); ~6 days on 2 CPU cores, scaled the same way. `:demo` MEASURED 210 s on 2 idle CPU cores, the
`.npy` files and their shards included (2026-12-01, `benchmarks.paper_table`), plus ~1 min making the MP3s; `:test`
ESTIMATED 1-2 min on 2 cores.
"""

from configs import default

ORGANISERS_FRAMES = 1366  # 29.1 s at 12 kHz / hop 256, the baseline's central crop


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    default.set_model(config, variant, "vggish", {None: 64, "demo": 16, "test": 4}, dropout=0.5)
    default.use_plain_bce(config)
    config.dataset.config_name = "essentia96"
    if not variant:
        config.input.crop_frames = ORGANISERS_FRAMES
        config.input.eval_window_frames = ORGANISERS_FRAMES
    return config
