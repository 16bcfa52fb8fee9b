"""Exports a checkpoint of a CP-ResNet, FA-ResNet or Shake-Shake FA-ResNet: to the authors' PyTorch state_dict with
its settings beside it as JSON, or to an ONNX model from stored spectrogram windows to logits (`emorf_jax.export`).

    python -m emorf_jax.export --checkpoint=CKPT --format=torch --output=model.pt    # and model.json
    python -m emorf_jax.export --checkpoint=CKPT --format=onnx --output=model.onnx [--input_dtype=float32]

CKPT: any checkpoint a run writes (`runs/demo/swa`, `runs/demo/snapshots/242`, ...). The ONNX model takes windows as
the shards store them, time-major (batch, frames, n_mels), float16 by default, normalises them inside, and has
dynamic batch and frame axes; its metadata holds the tags, feature setting and evaluation window. The baselines
(VGG-ish, ResNet-18/34/50, CRNN) are not exported: neither format carries them here (see the error). The ONNX format
needs onnx, part of the plain install; the torch format needs torch, the `[export]` extra. Exit status: 0 when
exported, 1 when the format's package is missing, 2 for a usage error (unknown format, missing checkpoint, a model the
format cannot carry).
"""

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from emorf_jax import export


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emorf_jax.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint directory")
    parser.add_argument("--format", required=True, choices=export.FORMATS, help="what to write")
    parser.add_argument("--output", required=True, help="the file to write (torch: its settings go to <stem>.json)")
    parser.add_argument(
        "--input_dtype",
        default="float16",
        choices=export.INPUT_DTYPES,
        help="onnx: the dtype of the windows the model takes (default float16, as stored)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.format == "torch":
            written = export.export_torch(args.checkpoint, args.output)
        else:
            written = [export.export_onnx(args.checkpoint, args.output, args.input_dtype)]
    except (FileNotFoundError, export.UnsupportedModel) as error:
        parser.error(str(error))
    except ImportError as error:
        sys.exit(f"{parser.prog}: error: {error}")
    seconds = time.perf_counter() - start
    for path in written:
        print(f"{path}\t{Path(path).stat().st_size / 2**20:.2f} MiB")
    print(f"exported in {seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
