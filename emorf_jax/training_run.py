"""One training run in its own workdir, as the commands that start several runs (the ρ sweep, the ensemble recipe)
and the ERF command build them: a run's config (its ρ, seed and dataset) and training it unless it is finished.

A run is finished once it has written its test report (`run_folder.is_finished`); an unfinished one resumes from its
checkpoints, so a killed command that starts several runs continues where it stopped.
"""

import ml_collections

from emorf_jax import demo, run_folder, train
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


def train_unless_finished(config: ml_collections.ConfigDict, workdir: str, root: str) -> None:
    """Trains (or resumes) the run in `workdir` unless it is finished, first making the demo's data in `root` if the
    config asks for it. A workdir that holds a run of another config is refused, finished or not."""
    run_folder.record_config(workdir, config)
    if not run_folder.is_finished(workdir):
        demo.prepare_synthetic_data(config, root)
        train.train_and_evaluate(config, workdir)
