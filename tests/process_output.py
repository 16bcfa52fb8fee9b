"""A failed subprocess's stderr cut to fit an assertion message, with the cause of a crash ahead of its thread dump."""

import re

# Lines that name why a process died: glog's fatal and error lines (XLA, the coordination service), a C++ check's
# stack header, an uncaught C++ exception, Python's fatal error, and a traceback's exception line.
_CAUSE = re.compile(
    r"^(?:[FE]\d{4} |\*\*\* |terminate called|  what\(\):|Fatal Python error|[\w.]+(?:Error|Exception)\b)"
)
MAX_CHARS = 3000


def stderr_excerpt(stderr: str) -> str:
    """The lines naming a crash's cause (up to a third of MAX_CHARS), then the end of stderr, without the list of
    extension modules that Python's fatal-error handler prints (several kB of module names)."""
    lines = [line for line in stderr.splitlines() if not line.startswith("Extension modules:")]
    causes = "\n".join(line for line in lines if _CAUSE.match(line))[: MAX_CHARS // 3]
    tail = "\n".join(lines)[-(MAX_CHARS - len(causes)) :]
    return f"{causes}\n[...]\n{tail}" if causes else tail
