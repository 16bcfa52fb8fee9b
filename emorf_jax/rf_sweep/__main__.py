"""Trains a CP-ResNet config once per (rho, seed) and tabulates and plots PR-AUC against the maximal receptive field:

    python -m emorf_jax.rf_sweep --config=configs/faresnet.py --rho=1,3,5,7,9 --seeds=2 --workdir=W
        [--config.field=value ...] [--baselines=resnet18,resnet34,resnet50]

Each run trains through the ordinary training loop in `W/rho<rho>_seed<s>/` (seeds 0 to --seeds - 1): a finished run
(its test report written) is not trained again, a killed one resumes, so a killed sweep continues where it stopped.
Every `--config.field=value` holds for every run, as in `python -m emorf_jax.main` (e.g. `--config.num_epochs=30`,
`--config.dataset.data_dir=D` for the prepared dataset; without one a `:demo` config makes its synthetic MTG-Jamendo
in `W/data` as the demo does). The table (rho, the maximal RF as published and exact, validation and test PR-AUC of
the SWA model, the paper's, and of the selected model: mean and spread over the seeds) is printed and written to
`W/rf_sweep.md` and `W/rf_sweep.json`, the plot of PR-AUC against the RF to `W/rf_sweep.png`. --baselines trains
those vision ResNets (configs/<name>.py, the same variant as --config, with the overrides that are not `model.`
fields) per seed in `W/<name>_seed<s>/` on the same data and adds their rows and points (the slides' "Deeper =
better?").
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from data_prep import extras
from emorf_jax import command_line
from emorf_jax.models import receptive_field, resnet

PROG = "python -m emorf_jax.rf_sweep"
FLAGS = flags.FLAGS
command_line.define_flags(
    "A CP-ResNet family config[:variant], e.g. configs/faresnet.py; --config.field=value sets a field."
)
flags.DEFINE_string("rho", "1,3,5,7,9", "Comma-separated rho values.")
flags.DEFINE_integer("seeds", 1, "Runs per rho, seeds 0 to N-1.", lower_bound=1)
flags.DEFINE_string("workdir", None, "The runs, the table and the plot go here.")
flags.DEFINE_string("baselines", "", "Comma-separated vision ResNets to train beside it: resnet18,resnet34,resnet50.")
flags.mark_flag_as_required("workdir")


def rho_list(text: str) -> list[int]:
    """`1,3,5` -> [1, 3, 5], each a ρ the kernel schedule has."""
    rhos = [int(value) for value in text.split(",") if value.strip()]
    for rho in rhos:
        receptive_field.kernel_schedule(rho)  # raises ValueError for a ρ outside 0..MAX_RHO
    if not rhos or len(set(rhos)) != len(rhos):
        raise ValueError(f"--rho takes distinct values, e.g. 1,3,5; got {text!r}")
    return rhos


def baseline_list(text: str) -> list[str]:
    baselines = [name for name in text.split(",") if name.strip()]
    unknown = sorted(set(baselines) - set(resnet.STAGE_SIZES))
    if unknown:
        raise ValueError(f"--baselines {','.join(unknown)}: use some of {','.join(resnet.STAGE_SIZES)}")
    return baselines


def main(_argv: list[str]) -> None:
    try:
        rhos, baselines = rho_list(FLAGS.rho), baseline_list(FLAGS.baselines)
    except ValueError as error:
        command_line.refuse(error)
    extras.exit_unless_installed(extras.TRAIN, PROG)
    from emorf_jax import checkpoints, distributed, rf_sweep, training_run, workdir_lock  # training needs [train]

    command_line.quiet_libraries()
    try:
        training_run.with_rho(FLAGS.config, rhos[0])  # refuses a config of another model family before any work
    except ValueError as error:
        command_line.refuse(error)
    distributed.use_compilation_cache("xla_cache", FLAGS.workdir)  # one cache: a seed reuses its ρ's programs
    baseline_overrides = {
        name: value for name, value in command_line.overrides().items() if not name.startswith("model.")
    }
    variant = command_line.config_variant()
    try:
        table = rf_sweep.run(
            FLAGS.config, rhos, range(FLAGS.seeds), FLAGS.workdir, baselines, variant, baseline_overrides
        )
    except (workdir_lock.WorkdirLocked, checkpoints.StructureMismatch) as error:  # a run's own one line
        command_line.refuse(error)
    print(table)
    print(f"-> {os.path.join(FLAGS.workdir, rf_sweep.TABLE_NAME)}.md, .json, .png")


if __name__ == "__main__":
    sys.exit(app.run(main, flags_parser=command_line.parse_flags))
