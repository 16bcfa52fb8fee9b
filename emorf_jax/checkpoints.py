"""Orbax checkpoints of a run: the resumable state, kept snapshot members, the SWA model and the selected model.

Every checkpoint holds two items: `weights` (a pytree) and `meta` (JSON: model fields, tag list, feature settings,
normalisation statistics), so a checkpoint can be loaded and used without the training config. A run's final report
adds to the meta of every checkpoint it scores (final, best, SWA, each snapshot) that model's per-tag decision
thresholds chosen on validation (`THRESHOLDS`: floats in the meta's tag order, inf for a tag without a positive
validation track; read and written by `thresholds.py`); the resumable checkpoints have none.

A resumable checkpoint that cannot be read (a truncated or missing file) is reported in one line and moved to
`damaged/checkpoints-<step>/`, and the run resumes from the one before it (two are kept); one that reads whole but
holds another model structure than the config builds raises `StructureMismatch` and stays. A save that runs out of
disk space raises `OutOfSpace`, one line naming the step and directory; orbax writes a step into a temporary
directory and renames it into place when complete, so the checkpoints before it stay intact.

Layout of a workdir:
    config.json            the run's config; another config in the same workdir is refused
    run.lock               held by the run training there (workdir_lock.py)
    checkpoints/<step>/    latest TrainState (step, params, batch_stats, opt_state, average), for resuming; two kept
    snapshots/<step>/      snapshot-ensemble members (params, batch_stats), kept for good
    swa/<step>/            the averaged weights with re-estimated BatchNorm statistics
    best/<step>/           the weights chosen by validation (config.selection_metric)
"""

import logging as std_logging
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from data_prep import files

LATEST = "checkpoints"
SNAPSHOTS = "snapshots"
SWA = "swa"
BEST = "best"
KINDS = (LATEST, SNAPSHOTS, SWA, BEST)
_ITEMS = ("weights", "meta")
THRESHOLDS = "thresholds"
DAMAGED = "damaged"  # <workdir>/damaged/<kind>-<step>/: checkpoints that could not be read, moved out of the way
_OUT_OF_SPACE = {number: os.strerror(number) for number in files.DISK_FULL_ERRNOS}  # also read in tensorstore's texts


class OutOfSpace(OSError):
    """A write failed for want of disk space (or over a quota or a file size limit)."""


def out_of_space(error: BaseException, writing: str) -> OutOfSpace | None:
    """An `OutOfSpace` error with one line (what failed, what to do) if `error` or one of its causes is a full disk,
    a quota or a file size limit, whether raised by Python or reported in the text of a tensorstore status."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE:
            reason = os.strerror(error.errno)
            break
        reason = next((text for text in _OUT_OF_SPACE.values() if text in str(error)), None)
        if reason:
            break
        error = error.__cause__ or error.__context__
    else:
        return None
    return OutOfSpace(
        f"out of disk space ({reason}) while writing {writing}; free space and run the same command again"
    )


def open_manager(workdir: str, kind: str, *, read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager for one kind of checkpoint of a run (see the module docstring)."""
    keep = {LATEST: 2, SNAPSHOTS: None, SWA: 1, BEST: 1}
    if kind not in keep:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {sorted(keep)}")
    # read_only, for listing and restoring: no directory is created and none deleted. orbax's own read_only option
    # would log three warnings per manager.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep[kind],
        create=not read_only,
        cleanup_tmp_directories=not read_only,  # what a save that failed (a full disk) or was killed left behind
        enable_async_checkpointing=False,
        best_fn=(lambda metrics: metrics["score"]) if kind == BEST else None,
        best_mode="max",
        keep_checkpoints_without_metrics=kind != BEST,
    )
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), kind), options=options, item_names=_ITEMS)


def save(
    manager: ocp.CheckpointManager, step: int, weights: Any, meta: dict[str, Any], score: float | None = None
) -> None:
    """Saves host-local (unreplicated) `weights` and their metadata at `step`, unless a step this late is saved.

    Every process of a multi-process run calls this with the same weights (they are replicated): orbax writes
    numpy arrays from process 0 only and synchronises the processes, so the weights go to the host first.

    A resumed run replays the steps after its last resumable checkpoint, and with them the evaluation, snapshot
    and SWA saves it had already made before it was killed. Training is deterministic given the step, so what
    orbax holds from before the kill is what the replay would save: it is kept as it is.
    """
    latest = manager.latest_step()
    if latest is not None and step <= latest:
        return
    args = ocp.args.Composite(weights=ocp.args.StandardSave(jax.device_get(weights)), meta=ocp.args.JsonSave(meta))
    try:
        manager.save(step, args=args, metrics=None if score is None else {"score": float(score)}, force=True)
        manager.wait_until_finished()
    except Exception as error:
        full = out_of_space(error, f"the checkpoint of step {step} in {manager.directory}")
        if full is None:
            raise
        raise full from error


def restore(manager: ocp.CheckpointManager, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
    """(weights, meta) at `step` (default: the latest); `target` gives the structure when it is not plain dicts."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    args = ocp.args.Composite(weights=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    _drop_reads_abandoned_by_failed_restores()  # installed before: the first can come before the restore raises
    restored = manager.restore(step, args=args)
    return restored["weights"], restored["meta"]


def _drop_reads_abandoned_by_failed_restores() -> None:
    """Keeps a failed restore's report to its one line.

    When one read of a damaged checkpoint fails, orbax closes its event loop while tensorstore's other reads are in
    flight; each of those then raises `RuntimeError: Event loop is closed` as an unraisable exception, or, when its
    own read of the damaged file failed too, is logged by asyncio as "Task exception was never retrieved": a
    traceback on stderr per read, after the restore has returned. Those alone are dropped; every other unraisable
    exception goes to the hook that was in place, and asyncio's other messages are logged.
    """
    asyncio_logger = std_logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadFailures) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_AbandonedReadFailures())
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook


class _AbandonedReadFailures(std_logging.Filter):
    """Drops asyncio's report of a tensorstore read whose failure nobody awaited (the restore had already failed)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        unretrieved = str(record.msg).startswith("Task exception was never retrieved")
        return not (unretrieved and "tensorstore_spec" in str(error))


def restore_resumable(workdir: str, target: Any) -> Any | None:
    """The latest resumable state (of `target`'s structure) that can be read, or None when there is none.

    A checkpoint that cannot be read is reported in one line, by step and path, and moved to `damaged/` by process
    0, so that the saves of the resumed run (which skip steps not after the latest) replace it. One that reads but
    holds another structure than `target` (a change of the model's code or fields) raises `StructureMismatch` and
    nothing is moved: it is whole, and the code that wrote it can resume it.
    """
    damaged = []
    restored = None
    with open_manager(workdir, LATEST, read_only=True) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                if target is not None:  # from the tree's metadata, before any array is read
                    checkpoint = f"the resumable checkpoint of step {step} in {manager.directory}"
                    check_structure(stored_shapes(step_path(manager, step)), target, checkpoint)
                restored, _ = restore(manager, step, target=target)
                break
            except StructureMismatch:  # whole, so not damage
                raise
            except Exception as error:  # whatever orbax or tensorstore raise for a missing or truncated file
                logging.warning(
                    "The resumable checkpoint of step %d cannot be read (%s: %s); moving it to %s and trying the "
                    "one before it",
                    step,
                    type(error).__name__,
                    str(error).splitlines()[0][:200] if str(error) else "",
                    os.path.join(workdir, DAMAGED),
                )
                damaged.append(step)
    if damaged and jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, DAMAGED), exist_ok=True)
        for step in damaged:
            os.replace(os.path.join(workdir, LATEST, str(step)), os.path.join(workdir, DAMAGED, f"{LATEST}-{step}"))
    if damaged and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("damaged checkpoints moved")
    return restored


class StructureMismatch(ValueError):
    """A checkpoint that reads whole but holds other parameters (added, removed or reshaped) than the model the
    config builds: not damage, so it is left where it is."""


def stored_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The shape of every array of a checkpoint's weights by its path (`params/conv1/kernel`), read from orbax's
    tree metadata without the arrays; raises whatever orbax raises for a missing or damaged metadata file."""
    tree = ocp.StandardCheckpointHandler().metadata(pathlib.Path(path, "weights")).tree
    return {_path_name(keys): tuple(leaf.shape) for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_structure(stored: dict[str, tuple[int, ...]], target: Any, checkpoint: str) -> None:
    """Raises `StructureMismatch` naming the first array whose presence or shape differs between a checkpoint's
    `stored` shapes and `target`, the pytree the code builds."""
    built = {_path_name(path): tuple(np.shape(leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    differing = [name for name in built if stored.get(name) != built[name]]
    differing += [name for name in stored if name not in built]
    if not differing:
        return

    def described(shapes: dict[str, tuple[int, ...]], name: str) -> str:
        return f"shape {shapes[name]}" if name in shapes else "absent"

    first = differing[0]
    raise StructureMismatch(
        f"{checkpoint} holds a model of another structure than the config builds: {first} is "
        f"{described(stored, first)} there and {described(built, first)} in the model "
        f"({len(differing)} arrays differ); the checkpoint is whole and was left as it is: resume it with the code "
        "that wrote it, or train this model in another workdir"
    )


def _path_name(path: tuple[Any, ...]) -> str:
    """A pytree key path as `params/conv1/kernel`, the same for a dict, a dataclass and a (named) tuple."""
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def has_resumable(workdir: str) -> bool:
    """Whether the workdir holds a resumable checkpoint, which a run resumes from rather than starting at step 0."""
    directory = os.path.join(workdir, LATEST)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def load_checkpoint(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variables, meta) from a step directory (`<workdir>/snapshots/1200`) or a kind directory (its latest step).

    Needs no training config: the model is described by `meta["model"]`. For a resumable-state checkpoint the
    returned variables are its current parameters and BatchNorm statistics.
    """
    step_path = step_directory(path)
    with _reader(os.path.dirname(step_path)) as manager:
        weights, meta = restore(manager, int(os.path.basename(step_path)))
    variables = {"params": weights["params"], "batch_stats": weights["batch_stats"]}
    return jax.tree.map(jax.numpy.asarray, variables), meta


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
    """The directory of one step of a manager's checkpoints, a path that `load_checkpoint` takes."""
    return os.path.join(str(manager.directory), str(step))


def _reader(directory: str) -> ocp.CheckpointManager:
    """A manager that only restores (orbax's own read_only option would log two warnings)."""
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False), item_names=_ITEMS)


def step_directory(path: str) -> str:
    """The step directory a checkpoint path names: itself (`<workdir>/snapshots/1200`), or a kind directory's
    (`<workdir>/swa`) latest step."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if os.path.isdir(os.path.join(path, "meta")):
        return path
    with _reader(path) as manager:
        step = manager.latest_step()
    if step is None:
        kinds = [kind for kind in (SWA, BEST, SNAPSHOTS) if os.path.isdir(os.path.join(path, kind))]
        hint = (
            f": {path} is a run's folder; pass one of its checkpoints, e.g. --checkpoint={os.path.join(path, kinds[0])}"
            if kinds
            else ""
        )
        raise FileNotFoundError(f"no checkpoint in {path}{hint}")
    return os.path.join(path, str(step))


def meta_file(path: str) -> str:
    """The JSON file of a checkpoint's meta item, as orbax's JsonSave writes it."""
    return os.path.join(step_directory(path), "meta", "metadata")


# What every member of an average must share: averaged outputs of other tags, features or input statistics would be
# meaningless.
SHARED_META_KEYS = ("tags", "features", "normalisation")


def check_compatible(metas: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Raises ValueError unless the (path, meta) checkpoints share tags, features and normalisation."""
    first_path, first = metas[0]
    for path, meta in metas[1:]:
        for key in SHARED_META_KEYS:
            if meta[key] != first[key]:
                raise ValueError(f"{path} has other {key} than {first_path}: their outputs cannot be averaged")
