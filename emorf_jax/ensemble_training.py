"""The average ensemble of the winning run, from scratch: every member of an ensemble config
(`configs/avg_ensemble.py`) trained with the ordinary training loop, then their SWA models and last snapshots
averaged (`ensembles.py`).

Each member trains in `<root>/members/<config>_rho<rho>_seed<seed>/`, where a finished member is not trained again
and a killed one resumes; the ensemble's report and submission go to `<root>/ensemble/`. Without a prepared dataset
of its own, a `:demo` or `:test` recipe makes its synthetic MTG-Jamendo in `<root>/data` as the demo does.
"""

import importlib
import os
from collections.abc import Sequence

import ml_collections

from emorf_jax import checkpoints, demo, ensembles, report, train
from emorf_jax.models import registry


def with_rho(config: ml_collections.ConfigDict, rho: int) -> ml_collections.ConfigDict:
    """A copy of a CP-ResNet config with this ρ, and `max_rf` cleared so that the ρ is the one the model gets."""
    name = config.model.get("name", registry.DEFAULT_MODEL)
    if name != "cp_resnet":
        raise ValueError(f"rho sets the kernels of the CP-ResNet family; this config's model is {name!r}")
    config = config.copy_and_resolve_references()
    config.model.rho = rho
    config.model.max_rf = 0
    return config


def run_config(config: ml_collections.ConfigDict, rho: int, seed: int, data_dir: str) -> ml_collections.ConfigDict:
    """A copy of a CP-ResNet config for one run: its ρ (`with_rho`), seed and dataset."""
    config = with_rho(config, rho)
    config.seed = seed
    config.dataset.data_dir = data_dir
    return config


def member_config(name: str, rho: int, seed: int, variant: str, data_dir: str) -> ml_collections.ConfigDict:
    """The training config of one member: `configs/<name>.py:<variant>` with its ρ, seed and dataset."""
    return run_config(importlib.import_module(f"configs.{name}").get_config(variant or None), rho, seed, data_dir)


def member_workdir(root: str, name: str, rho: int, seed: int) -> str:
    return os.path.join(root, "members", f"{name}_rho{rho}_seed{seed}")


def is_finished(workdir: str) -> bool:
    """Whether the training run in `workdir` has written its test report (its last act)."""
    return os.path.exists(os.path.join(workdir, report.RUN_REPORT_DIR, report.RUN_SUMMARY))


def train_unless_finished(config: ml_collections.ConfigDict, workdir: str, root: str) -> None:
    """Trains (or resumes) the run in `workdir` unless it is finished, first making the demo's data in `root` if the
    config asks for it."""
    if not is_finished(workdir):
        demo.prepare_synthetic_data(config, root)
        train.train_and_evaluate(config, workdir)


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


def train_members(recipe: ml_collections.ConfigDict, root: str, data_dir: str) -> list[str]:
    """Trains the members not yet finished and returns the checkpoint directories of all of them."""
    paths = []
    for name, rho, seed in recipe.members:
        config = member_config(name, rho, seed, recipe.variant, data_dir)
        workdir = member_workdir(root, name, rho, seed)
        train_unless_finished(config, workdir, root)
        paths += member_checkpoints(workdir, recipe.checkpoints, config.snapshots.ensemble_size)
    return paths


def run(recipe: ml_collections.ConfigDict, root: str, data_dir: str = "") -> dict[str, float]:
    """The whole recipe: members, then their average; returns the ensemble's ten official test figures."""
    data_dir = data_dir or os.path.join(root, "data")
    paths = train_members(recipe, root, data_dir)
    members, prepared = ensembles.collect_members(data_dir, checkpoint_paths=paths)
    return ensembles.write_ensemble(os.path.join(root, "ensemble"), members, prepared).figures
