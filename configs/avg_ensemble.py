"""The structure of the winning run "3_avg_ensemble" (PR-AUC-macro 0.154609): several FA-ResNets and Shake-Shake
FA-ResNets of different ρ and seeds, each contributing its SWA weights and its last snapshots, their probabilities
averaged by the ensemble tool (`python -m emorf_jax.ensemble`). Run it with

    python -m emorf_jax.ensemble_recipe --config=configs/avg_ensemble.py[:demo|:test] --workdir=DIR
        [--config.dataset.data_dir=D] [--config.field=value ...]

The config holds a training config's fields (`configs/default.py`), so that a `--config.field=value` override is
checked against them ("did you mean") and then applied to every member, each built from its own `configs/<name>.py`
(`--config.num_epochs=30` holds for all); and `ensemble`: the members, by config file, ρ and seed, and the
checkpoints each contributes.

Cost: (none) ESTIMATED ~13 h on one H200 GPU and ~1.5 years on 2 CPU cores: six paper-size members trained one
after another, 9.1 runs of configs/default.py's estimate by XLA's FLOP count (a Shake-Shake member 2x, ρ=7 1.04x).
`:demo` ESTIMATED ~26 min on 2 CPU cores from MEASURED parts (2026-12-01, idle, `benchmarks.paper_table`): its row's
925 s (two members trained, the ensemble scored), the 209 s and 371 s of the FA-ResNet and Shake-Shake rows it
reuses, ~1 min making the data. `:test` ESTIMATED a few minutes on 2 cores (two tiny members).

UNVERIFIED: the authors do not list the members of their ensemble; the ρ and seeds below are ours.
"""

import ml_collections

from configs import default

# (config in configs/, ρ, seed) of every member at paper size; `:demo` and `:test` shrink the list.
PAPER_MEMBERS = (
    ("faresnet", 5, 0),
    ("faresnet", 5, 1),
    ("faresnet", 7, 0),
    ("shake_faresnet", 5, 0),
    ("shake_faresnet", 5, 1),
    ("shake_faresnet", 7, 0),
)
DEMO_MEMBERS = (("faresnet", 5, 0), ("faresnet", 7, 1), ("shake_faresnet", 5, 0), ("shake_faresnet", 7, 1))
TEST_MEMBERS = (("faresnet", 2, 0), ("shake_faresnet", 3, 1))


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    if variant not in (None, "", "demo", "test"):
        raise ValueError(f"unknown config variant {variant!r}: use 'demo', 'test' or none")
    config = default.get_config(variant)
    config.ensemble = ml_collections.ConfigDict()
    config.ensemble.variant = variant or ""  # the variant of every member's config
    config.ensemble.members = {"demo": DEMO_MEMBERS, "test": TEST_MEMBERS}.get(variant, PAPER_MEMBERS)
    config.ensemble.checkpoints = ("swa", "snapshots")  # per member: its SWA model, its last snapshots.ensemble_size
    return config
