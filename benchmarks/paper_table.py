"""Every row of the paper's table trained the same way on a synthetic MTG-Jamendo, beside the published figures:

    python -m benchmarks.paper_table [--out runs/paper_table]     # the demo's data and sizes (long on a CPU)
    python -m benchmarks.paper_table --quick                      # tiny sizes, for CI: the script cannot rot
    python -m benchmarks.paper_table --quick --rows vggish,popularity   # some rows only

Makes the demo's synthetic MTG-Jamendo once (real MP3s, 9 planted tags), prepares it as hop512 and hop1536 shards,
then trains every row with `train.train_and_evaluate` from its own config (`configs/<row>.py:demo`, or `:test`
with `--quick`): VGG-ish on the organisers' essentia96 format (`.npy` files made from the synthetic MP3s by
`data_prep.essentia_like`, librosa's mels in Essentia's format) and on our hop512 features, ResNet-34 and CRNN
(hop1536), ResNet-18 and ResNet-50 (hop512, the slides' "deeper = better?" baselines), CP-ResNet, FA-ResNet,
Shake-Shake FA-ResNet; the average ensemble is the recipe of `configs/avg_ensemble.py`
(`emorf_jax/ensemble_recipe/`), whose FA and Shake-Shake members include those two rows; the popularity baseline
predicts the most frequent synthetic training tag. Each row reports its SWA model's
whole-track test PR-AUC and ROC-AUC (macro), scored like the published ones (`metrics.mediaeval_metrics`, macro
figures over the tags with both classes). The published test figures are the official results on the REAL test set
(4,231 tracks, 56 tags, from `benchmarks/reference_data.py`; CP_ResNet's, which no results file holds, from the
MediaEval 2019 slides), the published validation PR-AUC the slides' (docs/fidelity.md); "n/a" where none is public.
Ours and published are not comparable in value, only in order.
Finished rows are not trained again when the command is repeated with the same `--out`. Writes
`<out>/paper_table.json` and `<out>/paper_table.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections

from benchmarks import reference_data
from configs import avg_ensemble, default
from data_prep import metadata
from data_prep.reader import load_prepared
from emorf_jax import baselines, demo, ensemble_recipe, metrics, report, training_run

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = reference_data.MEDIAEVAL2019
QUICK_TRACKS = 24  # the tests' synthetic set
FIGURES = ("PR-AUC-macro", "ROC-AUC-macro")


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    config: str  # configs/<config>.py; "avg_ensemble" and "popularity" are not trained as one model
    published: tuple[str, str] | None  # (results file under PUBLISHED, its row), None where no file holds it
    slides_validation: float | None = None  # the MediaEval 2019 slides' validation PR-AUC-macro, where they give it
    slides_test: float | None = None  # the slides' test PR-AUC-macro, for a row without a results file


ROWS = (
    Row(
        "VGG-ish (organisers' baseline), their essentia96 input",
        "vggish_essentia96",
        ("baseline/results.tsv", "vggish"),
    ),
    Row("VGG-ish, our hop512 input", "vggish", None),
    Row("ResNet-18", "resnet18", None),
    Row("ResNet-34", "resnet34", ("CP-JKU/results.tsv", "5_resnet34"), slides_validation=0.0924),
    Row("ResNet-50", "resnet50", None),
    Row("CRNN", "crnn", ("CP-JKU/results.tsv", "4_crnn"), slides_validation=0.0924),
    # The slides' figures: CP_ResNet was not submitted, so no results file holds them.
    Row("CP_ResNet", "cp_resnet", None, slides_validation=0.1097, slides_test=0.1325),
    Row("FA-ResNet", "faresnet", ("CP-JKU/results.tsv", "2_faresnet"), slides_validation=0.1149),
    Row(
        "Shake-Shake FA-ResNet",
        "shake_faresnet",
        ("CP-JKU/results.tsv", "1_shakefaresnet"),
        slides_validation=0.1132,
    ),
    Row("average ensemble", "avg_ensemble", ("CP-JKU/results.tsv", "3_avg_ensemble"), slides_validation=0.1189),
    Row("popularity", "popularity", ("baseline/results.tsv", "popular")),
)


def published_figures(row: Row) -> dict[str, float] | None:
    """The row's official test figures from the published results tables (the slides' PR-AUC where no table holds
    the row), or None where they are not available."""
    if row.published is None:
        return None if row.slides_test is None else {"PR-AUC-macro": row.slides_test}
    if not (PUBLISHED / row.published[0]).is_file():
        return None
    header, *lines = (PUBLISHED / row.published[0]).read_text().splitlines()
    names = header.split("\t")[1:]
    for line in lines:
        name, *values = line.split("\t")
        if name == row.published[1]:
            return dict(zip(names, map(float, values)))
    return None


def row_config(name: str, variant: str, data_dir: str, quick: bool) -> ml_collections.ConfigDict:
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    config.dataset.data_dir = data_dir
    if quick:
        config.dataset.synthetic_tracks = QUICK_TRACKS
    return config


def trained_row(config: ml_collections.ConfigDict, workdir: str, out: str) -> dict[str, float]:
    """Trains one row unless it is finished; its SWA model's test figures."""
    training_run.train_unless_finished(config, workdir, out)
    with open(os.path.join(workdir, report.RUN_REPORT_DIR, report.RUN_SUMMARY)) as f:
        summary = json.load(f)
    return summary["swa"] if "swa" in summary else summary["final"]


def popularity_row(out: str, data_dir: str) -> dict[str, float]:
    metadata_dir = os.path.join(out, "synthetic", "data")
    test_labels = metadata.split_labels(metadata_dir, 0, "test")
    predictions, decisions = baselines.popularity_baseline(
        metadata.split_labels(metadata_dir, 0, "train"), len(test_labels)
    )
    prepared = load_prepared(data_dir, "hop512", 0)  # the same test tracks as every trained row
    if tuple(prepared.tsv_track_ids["test"]) != tuple(prepared.parts["test"].track_ids):
        raise RuntimeError("the prepared test set lacks tracks of the test TSV: see its failures.tsv")
    return metrics.mediaeval_metrics(test_labels, predictions, decisions)


def run_table(out: str, quick: bool, rows: tuple[Row, ...] = ROWS) -> list[dict]:
    variant = "test" if quick else "demo"
    data_dir = os.path.join(out, "data")
    recipe = avg_ensemble.get_config(variant)
    recipe.dataset.data_dir = data_dir
    members = {name: (rho, seed) for name, rho, seed in reversed(recipe.ensemble.members)}  # each kind's first member
    start = time.monotonic()
    demo.prepare_synthetic_data(row_config("cp_resnet", variant, data_dir, quick), out)  # the hop512 shards
    print(f"synthetic data and hop512 shards: {time.monotonic() - start:.0f} s", flush=True)
    results = []
    for row in rows:
        start = time.monotonic()
        if row.config == "avg_ensemble":
            ours = ensemble_recipe.run(recipe, out)
        elif row.config == "popularity":
            ours = popularity_row(out, data_dir)
        else:
            config = row_config(row.config, variant, data_dir, quick)
            workdir = os.path.join(out, "rows", row.config)
            if row.config in members:  # the ensemble's member of this kind: trained once for both
                config.model.rho, config.seed = members[row.config]
                workdir = ensemble_recipe.member_workdir(out, row.config, *members[row.config])
            ours = trained_row(config, workdir, out)
        results.append(
            {
                "row": row.label,
                "config": row.config,
                "ours": {k: ours[k] for k in FIGURES},
                "published": published_figures(row),
                "published_validation": (
                    None if row.slides_validation is None else {"PR-AUC-macro": row.slides_validation}
                ),
                "seconds": time.monotonic() - start,
            }
        )
        print(f"{row.label}: done in {results[-1]['seconds']:.0f} s", flush=True)
    return results


def format_table(results: list[dict], quick: bool, seconds: float) -> str:
    def figure(figures: dict | None, name: str) -> str:
        return "n/a" if figures is None or name not in figures else f"{figures[name]:.4f}"

    tracks = QUICK_TRACKS if quick else default.get_config("demo").dataset.synthetic_tracks
    lines = [
        f"Paper table. ours: a SYNTHETIC MTG-Jamendo ({tracks} tracks, 9 planted tags, configs "
        f":{'test' if quick else 'demo'}), SWA model, whole-track test set. published: the REAL MTG-Jamendo "
        "(4,231 test tracks, 56 tags): the official test results, CP_ResNet's and every validation figure from the "
        "MediaEval 2019 slides. Not comparable in value.",
        "",
        "| row | config | ours PR-AUC | ours ROC-AUC | published validation PR-AUC | published PR-AUC "
        "| published ROC-AUC | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        lines.append(
            f"| {result['row']} | {result['config']} | {figure(result['ours'], 'PR-AUC-macro')} | "
            f"{figure(result['ours'], 'ROC-AUC-macro')} | {figure(result['published_validation'], 'PR-AUC-macro')} | "
            f"{figure(result['published'], 'PR-AUC-macro')} | {figure(result['published'], 'ROC-AUC-macro')} | "
            f"{result['seconds']:.0f} |"
        )
    lines.append("")
    lines.append(
        f"wall time {seconds:.0f} s in all, with the data preparation (the essentia96 and hop1536 "
        "shards in the first row of each)"
    )
    return "\n".join(lines)


def main_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.paper_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/paper_table", help="data, every row's run and the table")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (configs :test, 24 tracks), for CI")
    parser.add_argument(
        "--rows",
        default=",".join(row.config for row in ROWS),
        help="comma-separated rows by config name (default: all)",
    )
    args = parser.parse_args(argv)
    chosen = args.rows.split(",")
    unknown = sorted(set(chosen) - {row.config for row in ROWS})
    if unknown:
        parser.error(f"unknown rows {unknown}; choose among {[row.config for row in ROWS]}")
    start = time.monotonic()
    results = run_table(args.out, args.quick, tuple(row for row in ROWS if row.config in chosen))
    table = format_table(results, args.quick, time.monotonic() - start)
    Path(args.out, "paper_table.json").write_text(json.dumps(results, indent=2))
    Path(args.out, "paper_table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_cli())
