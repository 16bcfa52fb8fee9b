"""CP-ResNet's kernel schedule and receptive field for a rho: the per-layer table (kernel, stride, cumulative stride,
exact RF) and both RFs, the authors' published one and the exact one.

Examples:
  python -m emorf_jax.models.receptive_field --rho 5
  python -m emorf_jax.models.receptive_field --max_rf 100 --kind exact
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from emorf_jax.models.receptive_field import MAX_RHO, RF_KINDS, format_table, rho_for_max_rf


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m emorf_jax.models.receptive_field",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--rho", type=int, help=f"0..{MAX_RHO}")
    choice.add_argument("--max_rf", type=int, help="pick the rho with the largest RF not above this")
    parser.add_argument(
        "--kind", choices=sorted(RF_KINDS), default="published", help="which RF --max_rf refers to (default: published)"
    )
    args = parser.parse_args(argv)
    try:
        rho = args.rho if args.max_rf is None else rho_for_max_rf(args.max_rf, args.kind)
        print(format_table(rho))
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
