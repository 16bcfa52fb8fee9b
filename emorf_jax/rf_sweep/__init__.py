"""ρ sweeps: one training run per (ρ, seed) through the ordinary loop, then PR-AUC against the receptive field (RF).

The paper's central claim is that a CP-ResNet tags better when it sees less of its input, and ρ sets how far its RF
grows. A sweep trains every (ρ, seed) of a CP-ResNet config in `<root>/rho<ρ>_seed<s>/` as the ensemble recipe trains
its members (`training_run.train_unless_finished`): a run whose test report is written is finished and not
trained again, an unfinished one resumes from its checkpoints, and a run directory that holds another config is
refused. Without a prepared dataset, a `:demo` config makes its synthetic MTG-Jamendo in `<root>/data`.

Vision ResNets (`BASELINES`, the slides' "Deeper = better?") can train beside it, each config's same variant per
seed in `<root>/<name>_seed<s>/`, on the same data.

The table has a row per ρ, then per baseline: both maximal RFs (`receptive_field`: as published and exact; a
ResNet's exact one from `resnet.max_rf`) and, for the SWA model (the paper's figures) and the selected model, the
validation PR-AUC that the evaluation stored in the checkpoint's meta and the test PR-AUC of the run's
`report/test_report.json`, as mean and sample standard deviation over the seeds. It is written to
`<root>/rf_sweep.md` and `rf_sweep.json` (with every run's figures), and plotted in `rf_sweep.png`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import tqdm

from emorf_jax import checkpoints, report, run_folder, training_run
from emorf_jax.models import receptive_field, registry, resnet

TABLE_NAME = "rf_sweep"  # <root>/rf_sweep.{md,json,png}
METRIC = "PR-AUC-macro"
# The models whose validation figures their checkpoint stores, and that checkpoint's kind.
MODELS = {"swa": checkpoints.SWA, "selected": checkpoints.BEST}
BASELINES = tuple(resnet.STAGE_SIZES)  # config names (configs/<name>.py) that can train beside a sweep


def run_workdir(root: str, rho: int, seed: int) -> str:
    return os.path.join(root, f"rho{rho}_seed{seed}")


def baseline_workdir(root: str, name: str, seed: int) -> str:
    return os.path.join(root, f"{name}_seed{seed}")


def baseline_config(
    name: str, variant: str | None, seed: int, data_dir: str, overrides: dict[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """`configs/<name>.py:<variant>` with `overrides` (dotted field name -> value), this seed and dataset."""
    if name not in BASELINES:
        raise ValueError(f"baseline {name!r}: use one of {', '.join(BASELINES)}")
    config = importlib.import_module(f"configs.{name}").get_config(variant or None)
    config.update_from_flattened_dict(overrides or {})
    config.seed = seed
    config.dataset.data_dir = data_dir
    return config


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One finished run's PR-AUC: figures[model][split], None where the run has no such model (no SWA phase)."""

    rho: int | None  # None for a baseline
    seed: int
    figures: dict[str, dict[str, float | None]]
    baseline: str | None = None  # a name of BASELINES


@dataclasses.dataclass(frozen=True)
class SweepRow:
    """One ρ or baseline: its maximal RFs and, per model and split, the seeds' PR-AUC (mean and sample SD, NaN where
    unknown)."""

    rho: int | None
    published_rf: int | None  # None for a baseline: the authors published CP-ResNet RFs only
    exact_rf: int
    seeds: list[int]
    figures: dict[str, dict[str, list[float | None]]]
    baseline: str | None = None

    @property
    def label(self) -> str:
        return registry.DISPLAY_NAMES[self.baseline] if self.baseline else str(self.rho)

    def mean(self, model: str, split: str) -> float:
        values = [value for value in self.figures[model][split] if value is not None]
        return float(np.mean(values)) if values else float("nan")

    def sd(self, model: str, split: str) -> float:
        values = [value for value in self.figures[model][split] if value is not None]
        return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def train_sweep(
    config: ml_collections.ConfigDict,
    rhos: Sequence[int],
    seeds: Sequence[int],
    root: str,
    baselines: Sequence[str] = (),
    variant: str | None = None,
    baseline_overrides: dict[str, Any] | None = None,
) -> None:
    """Trains every (ρ, seed) run of `config`, and every (baseline, seed) run of the baselines' `variant` with
    `baseline_overrides`, that is not finished, resuming the unfinished ones; the dataset is `config`'s
    (`dataset.data_dir`, default `<root>/data`)."""
    # absolute, so that a rerun from another directory or spelling of the root meets the configs its runs recorded
    data_dir = os.path.abspath(config.dataset.data_dir or os.path.join(root, "data"))
    runs = [
        (f"rho={rho}", run_workdir(root, rho, seed), training_run.run_config(config, rho, seed, data_dir))
        for rho in rhos
        for seed in seeds
    ]
    runs += [
        (name, baseline_workdir(root, name, seed), baseline_config(name, variant, seed, data_dir, baseline_overrides))
        for name in baselines
        for seed in seeds
    ]
    bar = tqdm.tqdm(runs, desc="rho sweep", unit="run")
    for label, workdir, run in bar:
        bar.set_postfix_str(f"{label} seed={run.seed}" + (" (finished)" if run_folder.is_finished(workdir) else ""))
        training_run.train_unless_finished(run, workdir, root)


def run_result(workdir: str, rho: int | None, seed: int, baseline: str | None = None) -> RunResult:
    """The PR-AUC of a finished run's SWA and selected models on validation (checkpoint meta) and test (report)."""
    if not run_folder.is_finished(workdir):
        raise FileNotFoundError(f"the run in {workdir} is not finished: train the sweep first")
    with open(os.path.join(workdir, report.RUN_REPORT_DIR, report.RUN_SUMMARY)) as f:
        summary = json.load(f)
    figures = {}
    for model, kind in MODELS.items():
        if model not in summary:
            figures[model] = {split: None for split in report.SPLITS}
            continue
        _, meta = checkpoints.load_checkpoint(os.path.join(workdir, kind))
        figures[model] = {"validation": meta["validation"][METRIC], "test": summary[model][METRIC]}
    return RunResult(rho, seed, figures, baseline)


def sweep_rows(results: Sequence[RunResult]) -> list[SweepRow]:
    """The runs grouped by ρ, in increasing ρ, then by baseline in `BASELINES` order."""
    groups = sorted(
        {(result.baseline, result.rho) for result in results},
        key=lambda group: (group[0] is not None, BASELINES.index(group[0]) if group[0] else group[1]),
    )
    rows = []
    for baseline, rho in groups:
        group = sorted(
            (result for result in results if (result.baseline, result.rho) == (baseline, rho)),
            key=lambda result: result.seed,
        )
        figures = {
            model: {split: [result.figures[model][split] for result in group] for split in report.SPLITS}
            for model in MODELS
        }
        published, exact = (
            (None, resnet.max_rf(baseline))
            if baseline
            else (receptive_field.published_rf(rho), receptive_field.exact_rf(rho))
        )
        rows.append(SweepRow(rho, published, exact, [r.seed for r in group], figures, baseline))
    return rows


def _mean_sd(row: SweepRow, model: str, split: str) -> str:
    mean, sd = row.mean(model, split), row.sd(model, split)
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.4f}" if np.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def markdown_table(rows: Sequence[SweepRow]) -> str:
    """The sweep as a Markdown table: mean ± sample SD over the seeds (no SD for one seed)."""
    columns = [f"{model} {split}" for model in MODELS for split in report.SPLITS]
    lines = [
        f"| ρ | max RF (published) | max RF (exact) | seeds | {' | '.join(columns)} |",
        "|" + " --- |" * (4 + len(columns)),
    ]
    for row in rows:
        cells = [_mean_sd(row, model, split) for model in MODELS for split in report.SPLITS]
        seeds = ",".join(map(str, row.seeds))
        published = "-" if row.published_rf is None else row.published_rf
        lines.append(f"| {row.label} | {published} | {row.exact_rf} | {seeds} | {' | '.join(cells)} |")
    note = (
        f"{METRIC}, mean ± sample SD over the seeds. swa: the averaged weights, the paper's model; selected: the "
        "checkpoint chosen on validation. Validation figures are those the evaluation stored in the checkpoint. "
        "A ResNet row is a vision baseline trained beside the sweep; its RF is exact (the authors published none)."
    )
    return "\n".join([*lines, "", note])


def plot(rows: Sequence[SweepRow], path: str) -> None:
    """PR-AUC of the SWA model against the maximal RF (as published for the CP-ResNets, exact for the baselines):
    each seed a point, the mean a line for the CP-ResNets and a square for each baseline, validation and test, each
    mean labelled (as the slides' "Results with receptive field adaptation" and "Deeper = better?")."""
    pyplot = report.agg_pyplot()
    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    swept = [row for row in rows if row.baseline is None]
    for split, colour in zip(report.SPLITS, ("tab:blue", "tab:red")):
        for row in rows:
            rf = row.exact_rf if row.baseline else row.published_rf
            values = [value for value in row.figures["swa"][split] if value is not None]
            axes.scatter([rf] * len(values), values, color=colour, alpha=0.45, s=22)
            mean = row.mean("swa", split)
            if row.baseline:
                axes.scatter([rf], [mean], color=colour, marker="s", s=50, edgecolors="black")
            label = row.label if row.baseline else f"ρ={row.rho}"
            axes.annotate(label, (rf, mean), textcoords="offset points", xytext=(4, 5), fontsize=8)
        if swept:
            axes.plot(
                [row.published_rf for row in swept],
                [row.mean("swa", split) for row in swept],
                "-o",
                color=colour,
                label=f"{split} (SWA model)",
            )
    axes.set_xlabel("maximal receptive field (frames = mel bins; CP-ResNet as published, ResNets exact)")
    axes.set_ylabel(f"{METRIC}")
    axes.set_title("Results with receptive field adaptation")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _finite(value: float) -> float | None:
    """JSON has no NaN: an unknown mean or SD (no SWA model, one seed) is null."""
    return None if np.isnan(value) else value


def write_results(rows: Sequence[SweepRow], results: Sequence[RunResult], root: str) -> str:
    """`<root>/rf_sweep.md`, `.json` and `.png`; returns the table."""
    table = markdown_table(rows)
    with open(os.path.join(root, f"{TABLE_NAME}.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    summary = {
        "metric": METRIC,
        "rows": [
            {
                "rho": row.rho,
                "baseline": row.baseline,
                "published_rf": row.published_rf,
                "exact_rf": row.exact_rf,
                "seeds": row.seeds,
                **{
                    f"{model}_{split}": {"mean": _finite(row.mean(model, split)), "sd": _finite(row.sd(model, split))}
                    for model in MODELS
                    for split in report.SPLITS
                },
            }
            for row in rows
        ],
        "runs": [dataclasses.asdict(result) for result in results],
    }
    with open(os.path.join(root, f"{TABLE_NAME}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    plot(rows, os.path.join(root, f"{TABLE_NAME}.png"))
    return table


def run(
    config: ml_collections.ConfigDict,
    rhos: Sequence[int],
    seeds: Sequence[int],
    root: str,
    baselines: Sequence[str] = (),
    variant: str | None = None,
    baseline_overrides: dict[str, Any] | None = None,
) -> str:
    """The whole sweep: trains what is not finished, then writes and returns the table."""
    train_sweep(config, rhos, seeds, root, baselines, variant, baseline_overrides)
    results = [run_result(run_workdir(root, rho, seed), rho, seed) for rho in rhos for seed in seeds]
    results += [
        run_result(baseline_workdir(root, name, seed), None, seed, name) for name in baselines for seed in seeds
    ]
    return write_results(sweep_rows(results), results, root)
