"""Tags audio files with musicnn's MTT model in one process, one JSON row per file: the tagger that
`benchmarks.tagging_command --musicnn_python` times beside `emorf_jax.predict`.

    MUSICNN_PYTHON -m benchmarks.musicnn_folder --output=ROWS.jsonl FILE ...    # from the repository root

It runs in musicnn's own environment (its Python, not this package's: musicnn needs TensorFlow 2.15 and numpy < 2),
so it imports nothing of this repository. musicnn's `extractor` is its documented way to tag a file: 3-s patches
without overlap, 16-kHz audio from librosa, probabilities per patch; the row keeps the five tags of the highest mean.
"""

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.musicnn_folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+")
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default="MTT_musicnn")
    args = parser.parse_args()
    from musicnn.extractor import extractor  # after the arguments: --help works where musicnn is not installed

    with open(args.output, "a") as rows:
        for path in args.files:
            taggram, tags = extractor(path, model=args.model, extract_features=False)
            mean = taggram.mean(axis=0)
            top = [tags[index] for index in mean.argsort()[::-1][:5]]
            rows.write(json.dumps({"path": path, "top_tags": top}) + "\n")
            rows.flush()


if __name__ == "__main__":
    main()
