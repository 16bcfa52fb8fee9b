"""The structure of the winning run "3_avg_ensemble" (PR-AUC-macro 0.154609): several FA-ResNets and Shake-Shake
FA-ResNets of different ρ and seeds, each contributing its SWA weights and its last snapshots, their probabilities
averaged by the ensemble tool (`python -m emorf_jax.ensemble`). Run it with

    python -m emorf_jax.ensemble_recipe --config=configs/avg_ensemble.py[:demo|:test] --workdir=DIR [--data_dir=D]

UNVERIFIED: the authors do not list the members of their ensemble; the ρ and seeds below are ours.
"""

import ml_collections

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
    config = ml_collections.ConfigDict()
    config.variant = variant or ""  # the variant of every member's config
    config.members = {"demo": DEMO_MEMBERS, "test": TEST_MEMBERS}.get(variant, PAPER_MEMBERS)
    config.checkpoints = ("swa", "snapshots")  # per member: its SWA model and its last `snapshots.ensemble_size`
    return config
