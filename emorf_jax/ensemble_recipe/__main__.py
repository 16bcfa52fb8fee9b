"""Trains every member of an ensemble config (`configs/avg_ensemble.py`), the average ensemble of the winning run,
then averages their SWA models and last snapshots into one report and MediaEval submission:

    python -m emorf_jax.ensemble_recipe --config=configs/avg_ensemble.py[:demo|:test] --workdir=DIR
        [--config.dataset.data_dir=D] [--config.field=value ...]

Each member trains in `DIR/members/<config>_rho<rho>_seed<seed>/` (a finished member is not trained again, a killed
one resumes); the ensemble's report and submission go to `DIR/ensemble/`, laid out as `python -m emorf_jax.ensemble`
writes them. Every `--config.field=value` holds for every member, as in `python -m emorf_jax.main` (e.g.
`--config.num_epochs=30`); `--config.ensemble.members` and `--config.ensemble.checkpoints` choose the members. D is
the prepared dataset; without it the `:demo` variant makes its synthetic MTG-Jamendo in `DIR/data` as the demo does.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from data_prep import extras
from emorf_jax import command_line, report

PROG = "python -m emorf_jax.ensemble_recipe"
FLAGS = flags.FLAGS
command_line.define_flags("Ensemble config[:variant]; --config.field=value sets a field.", "configs/avg_ensemble.py")
flags.DEFINE_string("workdir", None, "Members' runs and the ensemble go here.")
flags.mark_flag_as_required("workdir")


def main(_argv: list[str]) -> None:
    extras.exit_unless_installed(extras.TRAIN, PROG)
    from emorf_jax import checkpoints, ensemble_recipe, workdir_lock  # imported after the check: training needs [train]

    command_line.quiet_libraries()
    try:
        figures = ensemble_recipe.run(FLAGS.config, FLAGS.workdir, command_line.overrides())
    except (workdir_lock.WorkdirLocked, checkpoints.StructureMismatch) as error:  # a member's run's own one line
        command_line.refuse(error)
    print(f"{len(FLAGS.config.ensemble.members)} trained members -> {os.path.join(FLAGS.workdir, 'ensemble')}")
    print(report.format_table(figures))


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=command_line.parse_flags))
