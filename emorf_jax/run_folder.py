"""What a run's workdir records about the run: the config it was started with (`config.json`, compared on every
start, so that a workdir never mixes two configs) and whether it is finished (its test report written); and the
refusal of a checkpoint folder given as a workdir. The rest of the layout: checkpoints.py, report.py, workdir_lock.py.
"""

import json
import os
from typing import Any

import jax
import ml_collections

from emorf_jax import checkpoints, report

CONFIG_FILE = "config.json"


def is_finished(workdir: str) -> bool:
    """Whether the training run in `workdir` has written its test report (its last act)."""
    return os.path.exists(os.path.join(workdir, report.RUN_REPORT_DIR, report.RUN_SUMMARY))


def refuse_checkpoint_folder(workdir: str) -> None:
    """Refuses a checkpoint folder of a run (`runs/x/swa`, `runs/x/snapshots/40`) given as a run's workdir."""
    path = os.path.abspath(workdir)
    if os.path.isdir(os.path.join(path, "meta")):  # a step directory: <run>/<kind>/<step>
        path = os.path.dirname(path)
    run = os.path.dirname(path)
    if os.path.basename(path) in checkpoints.KINDS and os.path.exists(os.path.join(run, CONFIG_FILE)):
        raise ValueError(
            f"{workdir} is a checkpoint folder of the run in {run}: give --workdir={run} to resume that run, or a new "
            "folder for a new one"
        )


def compare_config(workdir: str, config: ml_collections.ConfigDict) -> bool:
    """Whether the workdir records a config already; refuses one that records another config (writes nothing)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        previous = json.load(f)
    current = json.loads(config.to_json_best_effort())
    if previous != current:
        changed = sorted(config_differences(previous, current))
        raise ValueError(
            f"workdir {workdir} holds a run of another config (differences: {', '.join(changed)}); "
            "use a new --workdir, or the config that run was started with"
        )
    return True


def record_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Records the run's config in the workdir, or refuses a workdir that holds a run of another config."""
    if compare_config(workdir, config):
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    current = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:  # one writer; the other processes compared, or will compare, the same file
        with open(path + ".tmp", "w") as f:
            json.dump(current, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted names of the fields in which two config dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        return [d for k in keys for d in config_differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]
