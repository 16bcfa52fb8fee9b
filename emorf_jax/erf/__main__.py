"""Draws the effective receptive field (ERF) of trained checkpoints or untrained models over the input's frequency x
time plane, the maximal receptive field drawn on it, several models side by side:

    python -m emorf_jax.erf --checkpoint=runs/fa/swa [--checkpoint=...] --output=erf.png [--frames=256]
    python -m emorf_jax.erf --config=configs/faresnet.py --rho=1,9 --output=erf.png

The ERF is the gradient magnitude of the centre unit of each model's last conv map with respect to random inputs of
the model's mel bands and --frames frames (Luo et al. 2016). --config (with --rho for the CP-ResNet family, one model
per rho) adds untrained models, so that the effect of rho shows without training; a checkpoint or config of a baseline
(VGG-ish, CRNN, ResNet) gets its ERF, without a maximal RF, which is computed for the CP-ResNet family only. Prints a
line per model: its maximal RF and the extent that holds 95 % of the ERF.
"""

import argparse
import sys
from collections.abc import Sequence

import tqdm

from configs import load_config
from data_prep import extras, features
from emorf_jax import erf

PROG = "python -m emorf_jax.erf"

# The tag count of an untrained model (the real MTG-Jamendo's): its ERF does not depend on the head.
UNTRAINED_TAGS = 56


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", action="append", default=[], help="a checkpoint directory; repeat for more")
    parser.add_argument("--config", help="a config[:variant] whose untrained model(s) to add")
    parser.add_argument(
        "--rho", default="", help="comma-separated rho values for --config's CP-ResNet (default: its own)"
    )
    parser.add_argument("--output", required=True, help="the figure (PNG)")
    parser.add_argument("--frames", type=int, default=256, help="time frames of the random inputs (default 256)")
    parser.add_argument(
        "--examples", type=int, default=8, help="random inputs the gradients are summed over (default 8)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and untrained weights")
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.config:
        parser.error("give at least one --checkpoint or a --config")
    if args.rho and not args.config:
        parser.error("--rho applies to --config's model")
    jobs = [
        lambda path=path: erf.checkpoint_erf(path, args.frames, args.examples, args.seed) for path in args.checkpoint
    ]
    if args.config:
        try:
            config = load_config(args.config)
            rhos = [int(value) for value in args.rho.split(",") if value.strip()]
        except (FileNotFoundError, ValueError) as error:
            parser.error(str(error))
        extras.exit_unless_installed(extras.TRAIN, PROG)
        from emorf_jax import train, training_run  # imported after the check: the configs' models are train's

        try:
            configs = [training_run.with_rho(config, rho) for rho in rhos] or [config]
            fields = [train.model_fields(each, UNTRAINED_TAGS) for each in configs]
        except ValueError as error:
            parser.error(str(error))
        shape = erf.input_shape(features.settings_for(config.dataset.config_name).to_dict(), args.frames, args.examples)
        jobs += [lambda each=each: erf.untrained_erf(each, shape, args.seed) for each in fields]
    try:
        maps = [job() for job in tqdm.tqdm(jobs, desc="ERF", unit="model")]
    except (FileNotFoundError, ValueError) as error:  # no checkpoint there; an input the model cannot take
        parser.error(str(error))
    erf.plot(maps, args.output)
    for each in maps:
        print(erf.summary_line(each))
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
