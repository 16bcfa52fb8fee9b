"""Fine-tuning on a second tag set with few tracks, against training from scratch and a linear probe:

    python -m benchmarks.fine_tuning --out runs/fine_tuning            # ~20 min on 2 busy CPU cores
    python -m benchmarks.fine_tuning --out runs/fine_tuning_quick --quick   # tiny sizes, for the tests

Pretrains a small CP-ResNet on a synthetic MTG-Jamendo with mood/theme tag names (`data_prep.synthetic`, seed 0),
then makes a second synthetic MTG-Jamendo with genre tag names and another seed (other tracks, artists and
recordings; the same nine planted sounds, each under a genre name: `SUBSET_TAGS` in data_prep/synthetic) and trains on
10 % and 100 % of its training split:

* fine-tuned: `init_from` the pretrained SWA model, the whole network trained (`docs/training.md`, "Fine-tuning");
  no tag name is shared, so the head starts afresh;
* from scratch: the same config without `init_from`;
* linear probe: a scikit-learn logistic regression per tag on the pretrained SWA model's whole-track embeddings
  (`tagger.Tagger.tag_stored`, what `python -m emorf_jax.predict --embeddings` writes), standardised.

The 10 % training set is a reproducible draw (`subsample`, seed 0) of the training TSV's tracks, written as the
training TSV of a copy of the metadata and built into shards of its own (features from the full build's cache);
validation and test are the full split's. Its runs take 1/fraction times the epochs (every epoch field of the config
scaled), so that every run makes the same number of optimiser steps. Each trained condition runs with 3 seeds
(initialisation, crops, mixup; `--quick`: one seed); the probe is deterministic given the embeddings and its three
seeds give the same figure. Scores: test PR-AUC-macro (whole tracks, `metrics.mediaeval_metrics`) of each run's SWA
model. Finished runs are not trained again when the command is repeated with the same `--out`. Writes
`<out>/fine_tuning.json` and `<out>/fine_tuning.md` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ml_collections
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from configs import default
from data_prep import layout, metadata
from data_prep.reader import FrameReader, load_prepared
from emorf_jax import demo, distributed, metrics, report, tagger, training_run

PRETRAIN_SUBSET = "moodtheme"
TARGET_SUBSET = "genre"
FRACTIONS = (0.1, 1.0)
CONDITIONS = ("fine-tuned", "from scratch", "linear probe")
SUBSAMPLE_SEED = 0
SUBSAMPLE_DRAWS = 100


@dataclasses.dataclass(frozen=True)
class Sizes:
    variant: str  # configs/default.py's variant the runs start from
    pretrain_tracks: int
    target_tracks: int
    duration: float  # median synthetic track length, seconds
    overrides: dict  # config fields (dotted) set on top of the variant, for every run
    seeds: tuple[int, ...] = (0, 1, 2)
    fractions: tuple[float, ...] = FRACTIONS  # of the target's training tracks


SIZES = {
    True: Sizes("test", 24, 48, 3.0, {}, seeds=(0,), fractions=(0.5,)),  # subsampled: three short trainings
    False: Sizes(
        "demo",
        200,
        200,
        6.0,
        {
            "model.base_channels": 8,
            "batch_size": 8,
            "num_epochs": 10,
            "lr_constant_epochs": 4,
            "lr_decay_end_epoch": 8,
            "weight_average.start_epoch": 8,
            "snapshots.start_epoch": 8,
            "eval_every_epochs": 5.0,
            "checkpoint_every_steps": 200,
        },
    ),
}
EPOCH_FIELDS = (
    "num_epochs",
    "lr_constant_epochs",
    "lr_decay_end_epoch",
    "weight_average.start_epoch",
    "weight_average.every_epochs",
    "snapshots.start_epoch",
    "snapshots.every_epochs",
    "eval_every_epochs",
)


def _set(config: ml_collections.ConfigDict, field: str, value) -> None:
    *parents, name = field.split(".")
    for parent in parents:
        config = config[parent]
    config[name] = value


def _get(config: ml_collections.ConfigDict, field: str):
    for name in field.split("."):
        config = config[name]
    return config


def base_config(
    sizes: Sizes, data_dir: str, subset: str, synthetic_seed: int, tracks: int
) -> ml_collections.ConfigDict:
    """The CP-ResNet config of every run: the variant, the overrides, and the synthetic data it is prepared from."""
    config = default.get_config(sizes.variant)
    for field, value in sizes.overrides.items():
        _set(config, field, value)
    config.dataset.data_dir = data_dir
    config.dataset.synthetic_tracks = tracks
    config.dataset.synthetic_seed = synthetic_seed
    config.dataset.synthetic_subset = subset
    config.dataset.synthetic_duration = sizes.duration
    return config


def with_epochs_scaled(config: ml_collections.ConfigDict, factor: float) -> ml_collections.ConfigDict:
    """A copy whose every epoch field is `factor` times the config's: the same steps on 1/factor of the tracks."""
    config = config.copy_and_resolve_references()
    for field in EPOCH_FIELDS:
        value = _get(config, field) * factor
        _set(config, field, round(value) if isinstance(_get(config, field), int) else float(value))
    return config


def subsample(tracks: list[metadata.Track], fraction: float, minimum: int, tags: tuple[str, ...]) -> list:
    """round(fraction x tracks) of the tracks (at least `minimum`), in TSV order: of SUBSAMPLE_DRAWS seeded draws the
    first that has the most tags with a positive, so that the small set covers the tags as well as it can."""
    count = min(len(tracks), max(minimum, round(fraction * len(tracks))))
    if count == len(tracks):
        return list(tracks)
    rng = np.random.default_rng(SUBSAMPLE_SEED)
    best, best_covered = None, -1
    for _ in range(SUBSAMPLE_DRAWS):
        chosen = np.sort(rng.choice(len(tracks), count, replace=False))
        covered = len({tag for index in chosen for tag in tracks[index].tags} & set(tags))
        if covered > best_covered:
            best, best_covered = chosen, covered
    return [tracks[index] for index in best]


def prepare_fraction(config: ml_collections.ConfigDict, root: str, fraction: float) -> str:
    """The prepared data of `fraction` of the target's training split (all of it: the full build); its data_dir."""
    full = config.dataset.data_dir
    if fraction == 1.0:
        return full
    percent = round(100 * fraction)
    data_dir = os.path.join(root, f"data_{percent}pct")
    if layout.is_prepared(data_dir, config.dataset.config_name, 0):
        return data_dir
    source = os.path.join(root, "synthetic", "data")
    metadata_dir = os.path.join(root, f"metadata_{percent}pct")
    shutil.rmtree(metadata_dir, ignore_errors=True)
    shutil.copytree(source, metadata_dir)
    subset = config.dataset.synthetic_subset
    tags = metadata.read_tag_list(source, subset, 0)
    train = metadata.read_split(source, 0, "train", subset, tags)
    chosen = subsample(train, fraction, config.batch_size, tags)
    metadata.write_tracks(metadata.split_tsv_path(metadata_dir, 0, "train", subset), chosen)
    command = [
        sys.executable,
        "-m",
        "data_prep.build",
        "--audio_dir",
        os.path.join(root, "synthetic", "audio"),
        "--metadata_dir",
        metadata_dir,
        "--data_dir",
        data_dir,
        "--cache_dir",
        os.path.join(full, "cache", config.dataset.config_name),
        "--features",
        config.dataset.config_name,
        "--split",
        "0",
        "--workers",
        str(config.dataset.workers),
        "--subset",
        subset,
        "--no_progress",
    ]
    if config.dataset.chunk_frames:
        command += ["--chunk_frames", str(config.dataset.chunk_frames)]
    subprocess.run(command, check=True)
    return data_dir


def trained(config: ml_collections.ConfigDict, workdir: str, root: str) -> dict:
    """Trains one run unless it is finished: its SWA model's test figures and the wall time of its training."""
    timing = os.path.join(workdir, "benchmark_seconds.json")
    start = time.monotonic()
    training_run.train_unless_finished(config, workdir, root)
    if not os.path.exists(timing):
        Path(timing).write_text(json.dumps({"seconds": time.monotonic() - start}))
    with open(os.path.join(workdir, report.RUN_REPORT_DIR, report.RUN_SUMMARY)) as f:
        summary = json.load(f)
    figures = summary["swa"] if "swa" in summary else summary["final"]
    return {"PR-AUC-macro": figures["PR-AUC-macro"], "seconds": json.loads(Path(timing).read_text())["seconds"]}


def embeddings(checkpoint: str, data_dir: str, config_name: str) -> dict[str, tuple[np.ndarray, np.ndarray, tuple]]:
    """{part: (whole-track embeddings, labels, track ids)} of the train and test parts of a prepared dataset, from a
    checkpoint's tagger (normalised with the checkpoint's own statistics, as `predict --embeddings` does)."""
    prepared = load_prepared(data_dir, config_name, 0)
    model = tagger.load_tagger(checkpoint)
    reader = FrameReader(prepared)
    try:
        out = {}
        for part in ("train", "test"):
            entry = prepared.parts[part]
            vectors = [model.tag_stored(reader.read(part, index)).embedding for index in range(len(entry))]
            out[part] = (np.stack(vectors), np.asarray(entry.labels, bool), tuple(entry.track_ids))
        return out
    finally:
        reader.close()


def linear_probe(features: dict, train_ids: tuple[str, ...]) -> float:
    """Test PR-AUC-macro of a logistic regression per tag on the embeddings of `train_ids` (a tag without a positive
    there predicts its training rate, 0)."""
    train_x, train_y, ids = features["train"]
    rows = np.array([ids.index(track) for track in train_ids])
    train_x, train_y = train_x[rows], train_y[rows]
    test_x, test_y, _ = features["test"]
    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    scores = np.zeros(test_y.shape, np.float64)
    for tag in range(train_y.shape[1]):
        if train_y[:, tag].all() or not train_y[:, tag].any():
            scores[:, tag] = train_y[:, tag].mean()
            continue
        classifier = LogisticRegression(C=1.0, max_iter=2000).fit(train_x, train_y[:, tag])
        scores[:, tag] = classifier.predict_proba(test_x)[:, 1]
    return metrics.mediaeval_metrics(test_y, scores)["PR-AUC-macro"]


def run(out: str, quick: bool) -> dict:
    sizes = SIZES[quick]
    started = time.monotonic()
    # One persistent cache for every run: the runs of a fraction share their programs (the same shapes).
    distributed.use_compilation_cache(os.path.abspath(os.path.join(out, "xla_cache")), out)
    pre_root = os.path.join(out, "pretrain")
    pretrain = base_config(sizes, os.path.join(pre_root, "data"), PRETRAIN_SUBSET, 0, sizes.pretrain_tracks)
    pretrain_workdir = os.path.join(pre_root, "run")
    start = time.monotonic()
    pretrained = trained(pretrain, pretrain_workdir, pre_root)
    pretrained["seconds_with_data"] = time.monotonic() - start
    print(f"pretrained on {PRETRAIN_SUBSET}: {pretrained}", flush=True)
    checkpoint = os.path.join(pretrain_workdir, "swa")

    target_root = os.path.join(out, "target")
    target = base_config(sizes, os.path.join(target_root, "data"), TARGET_SUBSET, 1, sizes.target_tracks)
    start = time.monotonic()
    demo.prepare_synthetic_data(target, target_root)
    data_seconds = time.monotonic() - start
    start = time.monotonic()
    features = embeddings(checkpoint, target.dataset.data_dir, target.dataset.config_name)
    embedding_seconds = time.monotonic() - start

    results = []
    for fraction in sizes.fractions:
        percent = round(100 * fraction)
        start = time.monotonic()
        data_dir = prepare_fraction(target, target_root, fraction)
        prepared = load_prepared(data_dir, target.dataset.config_name, 0)
        row = {
            "fraction": fraction,
            "train_tracks": len(prepared.parts["train"]),
            "test_tracks": len(prepared.parts["test"]),
            "data_seconds": time.monotonic() - start,
            "conditions": {},
        }
        for condition in CONDITIONS:
            runs = []
            for seed in sizes.seeds:
                if condition == "linear probe":
                    start = time.monotonic()
                    score = linear_probe(features, tuple(prepared.parts["train"].track_ids))
                    runs.append({"seed": seed, "PR-AUC-macro": score, "seconds": time.monotonic() - start})
                    continue
                config = with_epochs_scaled(target, 1.0 / fraction)
                config.dataset.data_dir = data_dir
                config.dataset.synthetic_tracks = 0  # prepared above
                config.seed = seed
                if condition == "fine-tuned":
                    config.init_from = os.path.abspath(checkpoint)
                name = f"{condition.replace(' ', '_')}_{percent}pct_seed{seed}"
                runs.append({"seed": seed, **trained(config, os.path.join(out, "runs", name), target_root)})
                print(f"{name}: {runs[-1]}", flush=True)
            row["conditions"][condition] = runs
        results.append(row)
    return {
        "pretrain": {"subset": PRETRAIN_SUBSET, "tracks": sizes.pretrain_tracks, **pretrained},
        "target": {
            "subset": TARGET_SUBSET,
            "tracks": sizes.target_tracks,
            "train_tracks": len(load_prepared(target.dataset.data_dir, target.dataset.config_name, 0).parts["train"]),
            "data_seconds": data_seconds,
        },
        "embedding_seconds": embedding_seconds,
        "variant": sizes.variant,
        "seeds": sizes.seeds,
        "overrides": sizes.overrides,
        "results": results,
        "seconds": time.monotonic() - started,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def summary_rows(figures: dict) -> list[dict]:
    """One row per fraction and condition: mean and SD over the seeds of PR-AUC-macro and wall seconds."""
    rows = []
    for result in figures["results"]:
        for condition, runs in result["conditions"].items():
            scores = np.array([run["PR-AUC-macro"] for run in runs])
            seconds = np.array([run["seconds"] for run in runs])
            rows.append(
                {
                    "fraction": result["fraction"],
                    "train_tracks": result["train_tracks"],
                    "condition": condition,
                    "seeds": len(runs),
                    "pr_auc_mean": float(scores.mean()),
                    "pr_auc_sd": float(scores.std(ddof=1)) if len(runs) > 1 else 0.0,
                    "seconds_mean": float(seconds.mean()),
                    "seconds_sd": float(seconds.std(ddof=1)) if len(runs) > 1 else 0.0,
                }
            )
    return rows


def format_table(figures: dict) -> str:
    pretrain = figures["pretrain"]
    lines = [
        f"Fine-tuning on a second tag set. Pretrained: CP-ResNet (configs/default.py :{figures['variant']}, "
        f"overrides {figures['overrides'] or 'none'}) on a synthetic MTG-Jamendo with {PRETRAIN_SUBSET} names "
        f"({pretrain['tracks']} tracks, seed 0): test PR-AUC-macro {pretrain['PR-AUC-macro']:.4f}, "
        f"{pretrain['seconds_with_data']:.0f} s with its data. Target: another synthetic MTG-Jamendo "
        f"({figures['target']['tracks']} tracks, seed 1) with {TARGET_SUBSET} names for the same nine planted sounds; "
        f"test PR-AUC-macro of the SWA model (linear probe: of the logistic regressions) on its whole test split, "
        f"mean ± SD over seeds {', '.join(map(str, figures['seeds']))}; wall s per run (probe: fit and score only; the "
        f"embeddings took {figures['embedding_seconds']:.0f} s once).",
        "",
        "| training tracks | condition | test PR-AUC-macro | wall s per run |",
        "| --- | --- | --- | --- |",
    ]
    for row in summary_rows(figures):
        lines.append(
            f"| {round(100 * row['fraction'])} % ({row['train_tracks']}) | {row['condition']} | "
            f"{row['pr_auc_mean']:.4f} ± {row['pr_auc_sd']:.4f} | {row['seconds_mean']:.1f} ± {row['seconds_sd']:.1f} |"
        )
    lines += ["", f"wall time {figures['seconds']:.0f} s in all; {figures['machine']}; {figures['date']}"]
    return "\n".join(lines)


def main_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fine_tuning",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/fine_tuning", help="both datasets, every run and the table")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (configs :test), for the tests")
    args = parser.parse_args(argv)
    figures = run(args.out, args.quick)
    figures["rows"] = summary_rows(figures)
    table = format_table(figures)
    Path(args.out, "fine_tuning.json").write_text(json.dumps(figures, indent=2))
    Path(args.out, "fine_tuning.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_cli())
