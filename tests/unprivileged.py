"""Commands for which a file's permissions count even when the tests run as root, as CI does.

Root reads a `chmod 000` file through two capabilities, CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH. `command(argv)`
runs `argv` in a process that drops them from its bounding set first, so that neither it nor its own children
(bulk tagging's feature processes) get them back: it stays uid 0 and reads the interpreter, the repository and
pytest's temporary folders (mode 0700) as before, but a file whose mode denies it is denied.
"""

import ctypes
import os
import sys
from collections.abc import Sequence
from pathlib import Path

PR_CAPBSET_DROP = 24  # <linux/prctl.h>
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2  # <linux/capability.h>
REPO = Path(__file__).resolve().parents[1]

# A fresh interpreter drops the capabilities, then becomes the command: a fork of the test process, which runs JAX's
# threads, must not run Python (subprocess's preexec_fn).
_LAUNCHER = (
    "import os, sys; sys.path.insert(0, sys.argv.pop(1)); from tests import unprivileged; "
    "unprivileged.drop_permission_override(); os.execv(sys.argv[1], sys.argv[1:])"
)


def drop_permission_override() -> None:
    """This process, and what it executes or starts from now on, respects file permissions (as every user but
    root always does)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"cannot drop capability {capability} from the bounding set: {os.strerror(error)}")


def command(argv: Sequence[str]) -> list[str]:
    """`argv` (its program a path, as `sys.executable`) run without root's power to read any file."""
    return [sys.executable, "-c", _LAUNCHER, str(REPO), *argv]
