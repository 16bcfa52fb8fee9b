"""FA-ResNet: CP-ResNet (ρ=5) with the frequency-aware channel, the paper's second run.

Run: `python -m emorf_jax.main --config=configs/faresnet.py[:demo|:test|:dcase] --workdir=runs/faresnet`. Cost: the
estimates of configs/default.py, made from this model's MEASURED step (33.6 GFLOP forward per example against the
CP-ResNet's 33.3): (none) ESTIMATED ~1.5 h on one H200 GPU, ~2 months on 2 CPU cores; `:dcase` ESTIMATED ~6.5 h and ~9
months; `:demo` MEASURED 2 min 57 s in all, 57 s of it making the data (2 CPU cores, 2026-12-05); `:test` ESTIMATED
1-2 min on 2 cores.
The ρ sweep, `python -m emorf_jax.rf_sweep --config=configs/faresnet.py --rho=1,3,5,7,9 --seeds=2 --workdir=W
--config.dataset.data_dir=D`: ten runs one after another, 9.8 of this one by XLA's FLOP count, so ESTIMATED ~14 h on
one H200 and ~1.6 years on 2 CPU cores; with `:demo`, MEASURED 23 min 54 s on 2 cores shared with other jobs
(2026-12-05, docs/results.md).
"""

from configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    config.model.frequency_aware = True
    return config
