"""Per-tag decision thresholds on disk: one reader and one writer, whatever holds them.

Two places hold them: a `tag<TAB>threshold` file (the organisers' thresholds.txt format; every report folder's
`thresholds.tsv`) and a checkpoint, whose meta stores one float per tag in its own tag order (`checkpoints.THRESHOLDS`,
written by the run's final report for every checkpoint it scores). A directory is read as a checkpoint, anything else
as a file.
"""

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emorf_jax import checkpoints

ADVICE = "give a tag<TAB>threshold file such as a run's report/<model>/thresholds.tsv"


def read(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(tag names, thresholds) from a thresholds file or a checkpoint. ValueError, saying what to give, for a file
    that cannot be read or is not one, or a checkpoint that stores none."""
    if os.path.isdir(path):
        try:
            meta = _read_meta(path)
        except FileNotFoundError:
            raise ValueError(f"cannot read the thresholds file {path}: {os.strerror(errno.EISDIR)}; {ADVICE}") from None
        values = meta.get(checkpoints.THRESHOLDS)
        if values is None:
            raise ValueError(
                f"{path} holds no decision thresholds (only the checkpoints a run's final report scored hold them): "
                "pass --thresholds with a tag<TAB>threshold file such as its run's report/<model>/thresholds.tsv"
            )
        return list(meta["tags"]), np.asarray(values, np.float64)
    return _read_file(path)


def write(path: str | Path, tags: Sequence[str], thresholds: Sequence[float]) -> None:
    """Writes per-tag thresholds to a thresholds file (every digit kept, so that decisions survive the round trip)
    or into a saved checkpoint's meta (replacing any; `tags` must be the checkpoint's, in its order)."""
    values = [float(value) for value in thresholds]
    if len(tags) != len(values):
        raise ValueError(f"{len(tags)} tags but {len(values)} thresholds")
    if os.path.isdir(path):
        _write_meta(path, list(tags), values)
    else:
        Path(path).write_text("".join(f"{tag}\t{value!r}\n" for tag, value in zip(tags, values)), encoding="utf-8")


def _read_file(path: str | Path) -> tuple[list[str], np.ndarray]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "not a text file"
        raise ValueError(f"cannot read the thresholds file {path}: {reason}; {ADVICE}") from None
    tags, values = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        try:
            if len(fields) != 2:
                raise ValueError(f"expected 2 tab-separated fields, got {len(fields)}")
            values.append(float(fields[1]))
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: {error}: {line!r}") from None
        tags.append(fields[0])
    if not tags:
        raise ValueError(f"{path} holds no thresholds")
    return tags, np.array(values)


def _read_meta(path: str | Path) -> dict:
    with open(checkpoints.meta_file(str(path)), encoding="utf-8") as f:
        return json.load(f)


def _write_meta(path: str | Path, tags: list[str], values: list[float]) -> None:
    """The new meta is written beside the old one and renamed over it, so a reader meets the old meta or the new,
    never a part of one."""
    meta_file = checkpoints.meta_file(str(path))
    meta = _read_meta(path)
    if tags != list(meta["tags"]):
        raise ValueError(f"thresholds for {len(tags)} tags that are not the {len(meta['tags'])} tags of {path}")
    meta[checkpoints.THRESHOLDS] = values
    with open(meta_file + ".tmp", "w", encoding="utf-8") as f:
        json.dump(meta, f)
    os.replace(meta_file + ".tmp", meta_file)
