"""CP-ResNet (ρ=5), the receptive-field-regularised ResNet without the frequency-aware channel.

Run: `python -m emorf_jax.main --config=configs/cp_resnet.py[:demo|:test|:dcase] --workdir=runs/cp_resnet`. Cost, as
configs/default.py (the same model) details: (none) ESTIMATED ~1.5 h on one H200 GPU, ~2 months on 2 CPU cores;
`:dcase` ESTIMATED ~6.5 h and ~9 months; `:demo` MEASURED 252 s on 2 idle CPU cores (2026-12-01,
`benchmarks.paper_table`, data made before) plus ~1 min making the data; `:test` ESTIMATED 1-2 min on 2 cores.
"""

from configs import default


def get_config(variant: str | None = None):
    return default.get_config(variant)
