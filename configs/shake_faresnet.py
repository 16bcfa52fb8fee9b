"""Shake-Shake FA-ResNet, the paper's first run. Its details are UNVERIFIED: the authors published no code for it.

Run: `python -m emorf_jax.main --config=configs/shake_faresnet.py[:demo|:test|:dcase] --workdir=runs/shake_faresnet`.
Cost: two residual branches, 66.6 GFLOP forward per example against the FA-ResNet's 33.6 (XLA's count), so configs/
default.py's estimates times 2: (none) ESTIMATED ~3 h on one H200 GPU, ~4 months on 2 CPU cores; `:dcase` ESTIMATED
~13 h and ~1.5 years; `:demo` MEASURED 371 s on 2 idle CPU cores (2026-12-01, `benchmarks.paper_table`, data made
before) plus ~1 min making the data; `:test` ESTIMATED 1-2 min on 2 cores.
"""

from configs import default


def get_config(variant: str | None = None):
    config = default.get_config(variant)
    config.model.frequency_aware = True
    config.model.shake_shake = True
    return config
