"""Commands whose files cannot grow past a size: a write beyond it fails with EFBIG, as on a full disk."""

import sys
from collections.abc import Sequence

# A fresh interpreter sets the limit, ignores SIGXFSZ (which would kill the process instead of failing the write) and
# then becomes the command: rlimits and an ignored signal survive exec. Not subprocess's preexec_fn: a fork of a test
# process, which runs JAX's threads, must not run Python. The command reads the tests' compilation cache but writes
# no entry there: JAX writes an entry in place, so one cut at the limit would stay, unreadable.
_LAUNCHER = (
    "import os, resource, signal, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = str(2**62); os.execv(sys.argv[2], sys.argv[2:])"
)


def command(argv: Sequence[str], limit: int) -> list[str]:
    """`argv` (its program a path, as `sys.executable`) run so that no file it or its children write grows past
    `limit` bytes."""
    return [sys.executable, "-c", _LAUNCHER, str(limit), *argv]
