"""Trains every member of an ensemble config (`configs/avg_ensemble.py`), the average ensemble of the winning run,
then averages their SWA models and last snapshots into one report and MediaEval submission:

    python -m emorf_jax.ensemble_recipe --config=configs/avg_ensemble.py[:demo|:test] --workdir=DIR [--data_dir=D]

Each member trains in `DIR/members/<config>_rho<rho>_seed<seed>/` (a finished member is not trained again, a killed
one resumes); the ensemble's report and submission go to `DIR/ensemble/`, laid out as `python -m emorf_jax.ensemble`
writes them. D is the prepared dataset; without it the `:demo` variant makes its synthetic MTG-Jamendo in `DIR/data`
as the demo does.
"""

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections

from emorf_jax import ensemble_training, report


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:variant]` -> its `get_config(variant)`."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("ensemble_config", path)
    if module_spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emorf_jax.ensemble_recipe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/avg_ensemble.py", help="ensemble config[:variant]")
    parser.add_argument("--workdir", required=True, help="members' runs and the ensemble go here")
    parser.add_argument("--data_dir", default="", help="prepared dataset (default: the demo's data in the workdir)")
    args = parser.parse_args(argv)
    try:
        recipe = load_config(args.config)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    figures = ensemble_training.run(recipe, args.workdir, args.data_dir)
    print(f"{len(recipe.members)} trained members -> {os.path.join(args.workdir, 'ensemble')}")
    print(report.format_table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
