"""One training run per workdir: a lock file, `<workdir>/run.lock`, held while a run trains there.

Two runs in one workdir would overwrite each other's checkpoints and reports, so a second one is refused with one
line naming the process that holds the workdir (pid, host, since when). The lock file is written complete under a
name of its own and then hard-linked to `run.lock`, which fails if that exists: an atomic create-if-absent on local
disks and on NFS alike (the classic NFS-safe lock, as O_EXCL), and no reader ever meets a half-written file.
fcntl/flock locks are not used, as NFS does not reliably honour them. The file holds the owner's pid, host and start
time as JSON, and its modification time is a heartbeat that a thread refreshes every `HEARTBEAT_SECONDS` while the
run lives.

A lock left behind by a process that died (SIGKILL, a crash, a lost machine) is taken over. Its owner counts as dead
when:
- it ran on this host and its pid is no longer alive (a pid reused by another process keeps the lock: the message
  names the file to delete);
- it ran on another host and the heartbeat is older than `STALE_SECONDS` (ten heartbeats: a live owner refreshes it
  well within that, even with the clocks of two hosts a few minutes apart).
A takeover first renames the stale file to a name of its own and checks that it moved the file it judged stale, so
that of two processes taking over at once only one wins.
"""

import contextlib
import datetime
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

LOCK_NAME = "run.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 10 * HEARTBEAT_SECONDS


class WorkdirLocked(RuntimeError):
    """Another live process trains in the workdir."""


def lock_path(workdir: str) -> str:
    return os.path.join(workdir, LOCK_NAME)


def _is_this_process(owner: dict) -> bool:
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def _owner_is_dead(owner: dict, heartbeat_age: float) -> bool:
    if owner.get("host") != socket.gethostname():
        return heartbeat_age > STALE_SECONDS
    if int(owner["pid"]) <= 0:  # a file that could not be parsed
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _read(path: str) -> tuple[dict, float] | None:
    """(owner, heartbeat age in seconds) of a lock file, None when there is none. A file that cannot be parsed (its
    owner died while writing it) counts as an owner of this host with a dead pid."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
        int(owner["pid"])
    except (ValueError, KeyError, TypeError):
        owner = {"pid": -1, "host": socket.gethostname(), "started": "?"}
    return owner, age


def _take_over(path: str, stale: dict) -> bool:
    """Moves a stale lock file out of the way; False if the file there was no longer the stale one."""
    aside = f"{path}.stale-{socket.gethostname()}-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # its owner, or another taker, removed it
    moved = _read(aside)
    if moved is not None and moved[0] != stale:  # a new owner's file: give it back unless a third one came
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        os.remove(aside)
        return False
    os.remove(aside)
    return True


def acquire(workdir: str) -> str:
    """Creates the workdir's lock file for this process, taking over a dead owner's; raises WorkdirLocked naming a
    live owner. Returns the lock file's path."""
    os.makedirs(workdir, exist_ok=True)
    path = lock_path(workdir)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    candidate = f"{path}.{record['host']}-{record['pid']}"
    with open(candidate, "w", encoding="utf-8") as f:
        json.dump(record, f)
    try:
        while True:
            try:
                os.link(candidate, path)
                return path
            except FileExistsError:
                pass
            existing = _read(path)
            if existing is None:
                continue
            owner, age = existing
            if not _owner_is_dead(owner, age):
                raise WorkdirLocked(
                    f"workdir {workdir} is in use by pid {owner['pid']} on host {owner.get('host')} since "
                    f"{owner.get('started')} ({path}); wait for that run to end, or delete {path} if that process "
                    "is not a training run"
                )
            _take_over(path, owner)
    finally:
        os.remove(candidate)


def release(path: str) -> None:
    """Removes the lock file if this process still owns it."""
    existing = _read(path)
    if existing is not None and _is_this_process(existing[0]):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[str]:
    """The workdir's lock for the duration of the block, its heartbeat refreshed by a daemon thread."""
    path = acquire(workdir)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):  # a full disk or a lost mount must not end the run
                os.utime(path)

    heartbeat = threading.Thread(target=beat, name="workdir lock heartbeat", daemon=True)
    heartbeat.start()
    try:
        yield path
    finally:
        stop.set()
        release(path)
