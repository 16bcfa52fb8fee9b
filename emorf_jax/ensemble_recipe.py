"""Trains every member of an ensemble config (`configs/avg_ensemble.py`), the average ensemble of the winning run,
then averages their SWA models and last snapshots into one report and MediaEval submission:

    python -m emorf_jax.ensemble_recipe --config=configs/avg_ensemble.py[:demo|:test] --workdir=DIR [--data_dir=D]

Each member trains in `DIR/members/<config>_rho<rho>_seed<seed>/` (a finished member is not trained again, a killed
one resumes); the ensemble's report and submission go to `DIR/ensemble/`, laid out as `python -m emorf_jax.ensemble`
writes them. D is the prepared dataset; without it the `:demo` variant makes its synthetic MTG-Jamendo in `DIR/data`
as the demo does.
"""

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from configs import load_config
from data_prep import extras
from emorf_jax import report

PROG = "python -m emorf_jax.ensemble_recipe"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
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
    extras.exit_unless_installed(extras.TRAIN, PROG)
    from emorf_jax import ensemble_training  # imported after the check: training needs the [train] extra

    figures = ensemble_training.run(recipe, args.workdir, args.data_dir)
    print(f"{len(recipe.members)} trained members -> {os.path.join(args.workdir, 'ensemble')}")
    print(report.format_table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
