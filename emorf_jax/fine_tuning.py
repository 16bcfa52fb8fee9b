"""Fine-tuning: a run that starts from another model's variables (`config.init_from`) instead of random ones.

The source is any checkpoint a run writes (a step or kind folder: `swa/`, `best/`, `snapshots/<step>`, the
resumable `checkpoints/`) or a PyTorch state_dict in the authors' CP-ResNet format (a file; its tags are read from
the JSON of the same name beside it, which `python -m emorf_jax.export --format=torch` writes). Every variable of
the run's model (parameters and BatchNorm statistics) is taken from the source where path and shape match. The
head, the variables whose shape follows the tag count, is matched by tag name: the rows of the tags both share are
kept and the run's other tags keep their fresh initialisation. Any other difference (a path one side lacks, another
shape) means another model family or width: `ModelMismatch` names the first, so that a run refuses it in one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from emorf_jax import checkpoints
from emorf_jax.models import registry, torch_import

VariablePath = tuple[str, ...]  # a variable's path, collection first: ("params", "in_c_conv", "kernel")
HEAD, TRUNK = "head", "trunk"  # the parameter groups of optax.multi_transform
_COLLECTIONS = ("params", "batch_stats")


class ModelMismatch(ValueError):
    """The source's variables do not fit the run's model: another family, width or input."""


@dataclasses.dataclass(frozen=True)
class Source:
    """What a fine-tuning source holds: its variables by path, its tags (None where it names none) and what of it
    is not model variables (left aside)."""

    path: str
    variables: dict[VariablePath, np.ndarray]
    tags: tuple[str, ...] | None
    left_aside: tuple[str, ...] = ()


def flatten(variables: Mapping[str, Any]) -> dict[VariablePath, Any]:
    """{path: leaf} of Flax variables, parameters first, then BatchNorm statistics, each in the model's order."""
    collections = [name for name in _COLLECTIONS if name in variables]
    collections += [name for name in variables if name not in collections]
    return {
        (name, *path): leaf
        for name in collections
        for path, leaf in traverse_util.flatten_dict(variables[name]).items()
    }


def _path_name(path: VariablePath) -> str:
    return "/".join(path)


def variable_shapes(fields: Mapping[str, Any], input_shape: tuple[int, ...]) -> dict[VariablePath, tuple[int, ...]]:
    """The shapes of the variables of the model `fields` describe, in the order the model creates them (so that a
    mismatch names the first layer that differs), computed without running it."""
    model = registry.build(fields)
    creation_order = []

    def initialise():
        variables = model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape, jnp.float32), train=False)
        creation_order.extend(flatten(variables))  # eval_shape's result has its keys sorted
        return variables

    shapes = flatten(jax.eval_shape(initialise))
    return {path: tuple(shapes[path].shape) for path in creation_order}


def head_axes(fields: Mapping[str, Any], input_shape: tuple[int, ...]) -> dict[VariablePath, int]:
    """{path: tag axis} of the head: the variables whose shape changes with the tag count, found by building the
    model with one tag more, so that every model family's head is found without naming its layers."""
    shapes = variable_shapes(fields, input_shape)
    wider = variable_shapes({**fields, "num_classes": fields["num_classes"] + 1}, input_shape)
    axes = {}
    for path, shape in shapes.items():
        if wider[path] != shape:
            (axes[path],) = (axis for axis, (a, b) in enumerate(zip(shape, wider[path])) if a != b)
    return axes


def parameter_groups(params: Any, head: Mapping[VariablePath, int]) -> Any:
    """`params` as a tree of HEAD and TRUNK labels (the `param_labels` of optax.multi_transform)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: HEAD if ("params", *path) in head else TRUNK for path in flat})


def read_source(path: str, fields: Mapping[str, Any], input_shape: tuple[int, ...]) -> Source:
    """The variables and tags of a checkpoint folder, or of the authors' PyTorch state_dict (a file), read for the
    run's model `fields` (the state_dict's keys are named by the model's paths)."""
    if not os.path.isfile(path):
        variables, meta = checkpoints.load_checkpoint(path)
        left_aside = ("its optimizer state and averaged weights",) if meta.get("kind") == "latest" else ()
        arrays = {name: np.asarray(leaf) for name, leaf in flatten(variables).items()}
        return Source(path, arrays, tuple(meta["tags"]), left_aside)
    if registry.model_name(fields) != "cp_resnet":
        raise ModelMismatch(
            f"init_from {path} is a file, read as the authors' PyTorch CP-ResNet state_dict, but the run's model is a "
            f"{registry.DISPLAY_NAMES[registry.model_name(fields)]}: give a checkpoint folder of that model"
        )
    try:
        state_dict = torch_import.load_torch_checkpoint(path)
    except ImportError as error:
        raise ValueError(f"init_from {path}: {error}") from error
    except Exception as error:  # whatever torch raises for a file that is not one of its pickles
        raise ValueError(
            f"init_from {path} is neither a checkpoint folder nor a PyTorch state_dict ({error})"
        ) from error
    found, other = torch_import.arrays_by_flax_path(state_dict, list(variable_shapes(fields, input_shape)))
    found.update({("state_dict", key): array for key, array in other.items()})
    return Source(path, found, _torch_tags(path))


def _torch_tags(path: str) -> tuple[str, ...] | None:
    """The tags of a state_dict file: the "tags" of the JSON of the same name beside it, if there is one."""
    settings_path = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(settings_path):
        return None
    with open(settings_path) as f:
        tags = json.load(f).get("tags")
    return None if tags is None else tuple(tags)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the source's variables fill the run's model: the head's rows `kept` as (run index, source index), and
    whether the head is loaded whole (the same tags in the same order)."""

    source: Source
    head: dict[VariablePath, int]
    kept: tuple[tuple[int, int], ...]
    head_loaded: bool
    summary: str


def plan(
    source: Source,
    shapes: Mapping[VariablePath, tuple[int, ...]],
    head: Mapping[VariablePath, int],
    tags: Sequence[str],
) -> Plan:
    """Matches the source's variables with the run's model (its variable `shapes`, `head` axes and `tags`);
    raises ModelMismatch naming the first variable that does not fit."""
    refusal = f"init_from {source.path} does not fit the run's model (another model family, width or input?):"
    source_width = len(source.tags) if source.tags is not None else None
    for path, shape in shapes.items():
        if path not in source.variables:
            raise ModelMismatch(f"{refusal} the model has {_path_name(path)} {shape}, the checkpoint has none")
        found = source.variables[path].shape
        axis = head.get(path)
        if axis is None:
            fits = found == shape
        else:
            fits = len(found) == len(shape) and all(a == b for i, (a, b) in enumerate(zip(found, shape)) if i != axis)
            source_width = found[axis] if source_width is None and fits else source_width
            fits = fits and found[axis] == source_width
        if not fits:
            raise ModelMismatch(f"{refusal} {_path_name(path)} is {found} in the checkpoint and {shape} in the model")
    extra = next((path for path in source.variables if path not in shapes), None)
    if extra is not None:
        raise ModelMismatch(
            f"{refusal} the checkpoint has {_path_name(extra)} {source.variables[extra].shape}, the model has none"
        )

    head_loaded = source.tags is not None and tuple(source.tags) == tuple(tags)
    positions = {tag: index for index, tag in enumerate(source.tags or ())}
    kept = tuple((index, positions[tag]) for index, tag in enumerate(tags) if tag in positions)
    loaded = [path for path in shapes if head_loaded or path not in head]
    parts = [f"init_from {source.path}: loaded {len(loaded)} of the model's {len(shapes)} variables"]
    if head_loaded:
        parts.append(f"the head's included (the same {len(tags)} tags)")
    else:
        kept_names = ", ".join(tags[index] for index, _ in kept) or "none"
        why = "" if source.tags is not None else ", the checkpoint names no tags (no JSON with its tags beside it)"
        parts.append(
            f"re-initialised the head ({len(head)} variables) for the run's {len(tags)} tags{why}, keeping the rows of "
            f"{len(kept)} tags both share ({kept_names}), new rows for {len(tags) - len(kept)}"
        )
    ignored = list(source.left_aside)
    if source.tags is not None and not head_loaded:
        ignored.append(f"the rows of {len(source.tags) - len(kept)} checkpoint tags the run lacks")
    parts.append(f"ignored: {', '.join(ignored) or 'nothing'}")
    return Plan(source, dict(head), kept, head_loaded, "; ".join(parts))


def fill(matched: Plan, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The run's freshly initialised `variables` with the source's where `matched` takes them."""
    filled = {}
    for path, fresh in flatten(variables).items():
        loaded = matched.source.variables[path]
        axis = matched.head.get(path)
        if axis is not None and not matched.head_loaded:
            value = np.array(fresh)
            if matched.kept:
                run_rows, source_rows = (list(rows) for rows in zip(*matched.kept))
                np.moveaxis(value, axis, 0)[run_rows] = np.moveaxis(loaded, axis, 0)[source_rows]
            loaded = value
        filled[path] = jnp.asarray(loaded, dtype=fresh.dtype)
    return {
        collection: traverse_util.unflatten_dict(
            {path[1:]: leaf for path, leaf in filled.items() if path[0] == collection}
        )
        for collection in variables
    }


def check(init_from: str, fields: Mapping[str, Any], tags: Sequence[str], input_shape: tuple[int, ...]) -> Plan:
    """Reads the source and matches it with the run's model without initialising it: a run's check before it
    writes anything. Raises ModelMismatch, or FileNotFoundError for a missing checkpoint."""
    source = read_source(init_from, fields, input_shape)
    return plan(source, variable_shapes(fields, input_shape), head_axes(fields, input_shape), tags)


def initial_variables(
    init_from: str,
    variables: Mapping[str, Any],
    fields: Mapping[str, Any],
    tags: Sequence[str],
    input_shape: tuple[int, ...],
) -> tuple[dict[str, Any], str]:
    """(the variables a fine-tuning run starts from, one line saying what was loaded, re-initialised and ignored):
    the freshly initialised `variables` of the run's model with the source's mapped onto them."""
    matched = check(init_from, fields, tags, input_shape)
    return fill(matched, variables), matched.summary
