"""The average ensemble of the winning run, from scratch: every member of an ensemble config
(`configs/avg_ensemble.py`) trained with the ordinary training loop, then their SWA models and last snapshots
averaged (`emorf_jax.ensemble`).

Each member trains in `<root>/members/<config>_rho<rho>_seed<seed>/`, where a finished member is not trained again
and a killed one resumes; the ensemble's report and submission go to `<root>/ensemble/`. Without a prepared dataset
of its own, a `:demo` or `:test` recipe makes its synthetic MTG-Jamendo in `<root>/data` as the demo does.
"""

import importlib
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from emorf_jax import checkpoints, ensemble, training_run


def member_config(
    name: str, rho: int, seed: int, variant: str, data_dir: str, overrides: dict[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """The training config of one member: `configs/<name>.py:<variant>` with `overrides` (dotted field name ->
    value, those of the recipe's command line), its ρ, seed and dataset."""
    config = importlib.import_module(f"configs.{name}").get_config(variant or None)
    config.update_from_flattened_dict(
        {field: value for field, value in (overrides or {}).items() if not field.startswith("ensemble.")}
    )
    return training_run.run_config(config, rho, seed, data_dir)


def member_workdir(root: str, name: str, rho: int, seed: int) -> str:
    return os.path.join(root, "members", f"{name}_rho{rho}_seed{seed}")


def member_checkpoints(workdir: str, kinds: Sequence[str], ensemble_size: int) -> list[str]:
    """The checkpoint directories one member contributes: its SWA model, its last `ensemble_size` snapshots."""
    paths = []
    for kind in kinds:
        if kind not in (checkpoints.SWA, checkpoints.SNAPSHOTS):
            raise ValueError(f"an ensemble takes 'swa' and 'snapshots' checkpoints, not {kind!r}")
        with checkpoints.open_manager(workdir, kind, read_only=True) as manager:
            steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{workdir} has no {kind} checkpoint: did the member train long enough?")
        chosen = steps[-1:] if kind == checkpoints.SWA else steps[-ensemble_size:]
        paths += [os.path.join(workdir, kind, str(step)) for step in chosen]
    return paths


def train_members(
    recipe: ml_collections.ConfigDict, root: str, data_dir: str, overrides: dict[str, Any] | None = None
) -> list[str]:
    """Trains the members not yet finished and returns the checkpoint directories of all of them."""
    paths = []
    for name, rho, seed in recipe.ensemble.members:
        config = member_config(name, rho, seed, recipe.ensemble.variant, data_dir, overrides)
        workdir = member_workdir(root, name, rho, seed)
        training_run.train_unless_finished(config, workdir, root)
        paths += member_checkpoints(workdir, recipe.ensemble.checkpoints, config.snapshots.ensemble_size)
    return paths


def run(recipe: ml_collections.ConfigDict, root: str, overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """The whole recipe: members, then their average; returns the ensemble's ten official test figures. `overrides`
    (dotted field name -> value) hold for every member; the dataset is the recipe's `dataset.data_dir`, default
    `<root>/data`."""
    data_dir = os.path.abspath(recipe.dataset.data_dir or os.path.join(root, "data"))
    paths = train_members(recipe, root, data_dir, overrides)
    members, prepared = ensemble.collect_members(data_dir, checkpoint_paths=paths)
    return ensemble.write_ensemble(os.path.join(root, "ensemble"), members, prepared).figures
