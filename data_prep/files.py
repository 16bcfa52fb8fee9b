"""Files written whole or not at all, and a full disk told apart from other write errors.

`write_atomically` writes a file under a temporary name and renames it into place, so that a killed run leaves the
whole file or none. `DISK_FULL_ERRNOS` are the errnos of a write that failed for want of space, which every writer
(the feature cache, the shards, checkpoints, tagging's outputs) tells apart from other errors: a full disk is not the
data's fault, so it stops the run with a message to free space instead of being recorded as a failed track.

No TensorFlow here, so that the read side, the model side and spawned workers can import it.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np

# What a write that fails for want of space raises, wherever it writes: a full disk, a quota, a file size limit.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def write_atomically(path: Path, array: np.ndarray) -> None:
    """Saves `array` as `path` (.npy) via a temporary file: a file there is always whole. The bytes are written by
    Python, whose OSError keeps the errno of a full disk (numpy's own short write loses it)."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    encoded = io.BytesIO()
    np.save(encoded, array)
    try:
        tmp.write_bytes(encoded.getbuffer())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
