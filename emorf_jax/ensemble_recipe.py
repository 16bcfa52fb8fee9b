"""The average ensemble of the winning run, from scratch: trains every member of an ensemble config
(`configs/avg_ensemble.py`) with the ordinary training loop, then averages their SWA models and last snapshots with
the ensemble tool (`emorf_jax.ensemble`):

    python -m emorf_jax.ensemble_recipe --config=configs/avg_ensemble.py[:demo|:test] --workdir=DIR [--data_dir=D]

Each member trains in `DIR/members/<config>_rho<ρ>_seed<seed>/` (a finished member is not trained again, a killed
one resumes); the submission, thresholds and figures go to `DIR/ensemble/` (see `emorf_jax.ensemble`). D is the
prepared dataset; without it the `:demo` variant makes its synthetic MTG-Jamendo in `DIR/data` as the demo does.
"""

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections

from emorf_jax import checkpoints, ensemble, train


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:variant]` -> its `get_config(variant)`."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("ensemble_config", path)
    if module_spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def member_config(name: str, rho: int, seed: int, variant: str, data_dir: str) -> ml_collections.ConfigDict:
    """The training config of one member: `configs/<name>.py:<variant>` with its ρ, seed and dataset."""
    config = importlib.import_module(f"configs.{name}").get_config(variant or None)
    config.model.rho = rho
    config.seed = seed
    config.dataset.data_dir = data_dir
    return config


def member_workdir(root: str, name: str, rho: int, seed: int) -> str:
    return os.path.join(root, "members", f"{name}_rho{rho}_seed{seed}")


def is_finished(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, "report", "test_report.json"))


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
    from emorf_jax import main  # only here: it makes the demo's data

    paths = []
    for name, rho, seed in recipe.members:
        config = member_config(name, rho, seed, recipe.variant, data_dir)
        workdir = member_workdir(root, name, rho, seed)
        if not is_finished(workdir):
            main.prepare_synthetic_data(config, root)
            train.train_and_evaluate(config, workdir)
        paths += member_checkpoints(workdir, recipe.checkpoints, config.snapshots.ensemble_size)
    return paths


def run(recipe: ml_collections.ConfigDict, root: str, data_dir: str = "") -> dict[str, float]:
    """The whole recipe: members, then their average; returns the ensemble's ten official test figures."""
    data_dir = data_dir or os.path.join(root, "data")
    paths = train_members(recipe, root, data_dir)
    output_dir = os.path.join(root, "ensemble")
    arguments = [f"--checkpoint={path}" for path in paths] + [f"--data_dir={data_dir}", f"--output_dir={output_dir}"]
    if ensemble.main(arguments) != 0:
        raise RuntimeError(f"the ensemble tool refused the members' checkpoints: {' '.join(arguments)}")
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return json.load(f)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emorf_jax.ensemble_recipe", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/avg_ensemble.py", help="ensemble config[:variant]")
    parser.add_argument("--workdir", required=True, help="members' runs and the ensemble go here")
    parser.add_argument("--data_dir", default="", help="prepared dataset (default: the demo's data in the workdir)")
    args = parser.parse_args(argv)
    try:
        recipe = load_config(args.config)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    run(recipe, args.workdir, args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
