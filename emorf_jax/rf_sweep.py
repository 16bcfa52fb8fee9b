"""Trains a CP-ResNet config once per (rho, seed) and tabulates and plots PR-AUC against the maximal receptive field:

    python -m emorf_jax.rf_sweep --config=configs/faresnet.py --rho=1,3,5,7,9 --seeds=2 --workdir=W [--data_dir=D]
        [--baselines=resnet18,resnet34,resnet50]

Each run trains through the ordinary training loop in `W/rho<rho>_seed<s>/` (seeds 0 to --seeds - 1): a finished run
(its test report written) is not trained again, a killed one resumes, so a killed sweep continues where it stopped.
The table (rho, the maximal RF as published and exact, validation and test PR-AUC of the SWA model, the paper's, and
of the selected model: mean and spread over the seeds) is printed and written to `W/rf_sweep.md` and `W/rf_sweep.json`,
the plot of PR-AUC against the RF to `W/rf_sweep.png`. --baselines trains those vision ResNets (configs/<name>.py, the
same variant as --config, e.g. `:demo`) per seed in `W/<name>_seed<s>/` on the same data and adds their rows and
points (the slides' "Deeper = better?"). D is the prepared dataset; without it a `:demo` config
(`--config=configs/faresnet.py:demo`) makes its synthetic MTG-Jamendo in `W/data` as the demo does.
"""

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from configs import load_config
from data_prep import extras
from emorf_jax.models import receptive_field, resnet

PROG = "python -m emorf_jax.rf_sweep"


def rho_list(text: str) -> list[int]:
    """`1,3,5` -> [1, 3, 5], each a ρ the kernel schedule has."""
    rhos = [int(value) for value in text.split(",") if value.strip()]
    for rho in rhos:
        receptive_field.kernel_schedule(rho)  # raises ValueError for a ρ outside 0..MAX_RHO
    if not rhos or len(set(rhos)) != len(rhos):
        raise ValueError(f"--rho takes distinct values, e.g. 1,3,5; got {text!r}")
    return rhos


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a CP-ResNet family config[:variant], e.g. configs/faresnet.py")
    parser.add_argument("--rho", default="1,3,5,7,9", help="comma-separated rho values (default 1,3,5,7,9)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per rho, seeds 0 to N-1 (default 1)")
    parser.add_argument("--workdir", required=True, help="the runs, the table and the plot go here")
    parser.add_argument("--data_dir", default="", help="prepared dataset (default: the demo's data in the workdir)")
    parser.add_argument(
        "--baselines", default="", help="comma-separated vision ResNets to train beside it: resnet18,resnet34,resnet50"
    )
    args = parser.parse_args(argv)
    try:
        rhos = rho_list(args.rho)
        if args.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
        config = load_config(args.config)
        baselines = [name for name in args.baselines.split(",") if name.strip()]
        unknown = sorted(set(baselines) - set(resnet.STAGE_SIZES))
        if unknown:
            raise ValueError(f"--baselines {','.join(unknown)}: use some of {','.join(resnet.STAGE_SIZES)}")
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    extras.exit_unless_installed(extras.TRAIN, PROG)
    from emorf_jax import distributed, ensemble_training, sweeps  # imported after the check: training needs [train]

    distributed.use_compilation_cache("xla_cache", args.workdir)  # one cache: a seed reuses its ρ's programs

    try:
        ensemble_training.with_rho(config, rhos[0])  # refuses a config of another model family before any work
    except ValueError as error:
        parser.error(str(error))
    variant = args.config.partition(":")[2] or None
    table = sweeps.run(config, rhos, range(args.seeds), args.workdir, args.data_dir, baselines, variant)
    print(table)
    print(f"-> {os.path.join(args.workdir, sweeps.TABLE_NAME)}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
