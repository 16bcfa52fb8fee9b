"""Multi-host data parallelism on JAX's own multi-controller runtime (`jax.distributed`).

Every process runs the same program on its local devices; `jax.pmap`'s axis then spans the devices of all
processes, so gradients, BatchNorm statistics and mixup's global batch are those of the whole job. What this
module adds is what the runtime leaves to the program: starting it, refusing processes that were given different
configs, a barrier, agreeing on the step at which a signalled run stops (`StopSignals`), ending every process with
the same line when one of them fails (`announce_failure`, `watch_for_failures`), and the compilation cache every
command shares. See docs/architecture.md, "Multi-host training".
"""

import atexit
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from emorf_jax import run_folder


def initialize(
    *,
    auto_detect: bool,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts the runtime when asked: `auto_detect` lets JAX read SLURM, Open MPI, Cloud TPU or Kubernetes from
    the environment; explicit values take precedence over what it would detect. Nothing asked: one process.

    Must run before any JAX computation. On CPU, cross-process collectives go through gloo.
    """
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if not auto_detect and all(value is None for value in explicit.values()):
        return
    missing = [name for name, value in explicit.items() if value is None]
    if not auto_detect and missing:
        raise ValueError(
            f"--{' and --'.join(missing)} missing: give all of --coordinator_address, --num_processes "
            "and --process_id, or --distributed to detect them from the cluster's environment"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as error:
        raise ValueError(
            f"cannot start JAX's distributed runtime ({error}): no SLURM, Open MPI, Cloud TPU or "
            "Kubernetes job was detected; pass --coordinator_address=HOST:PORT --num_processes=N "
            "--process_id=I"
        ) from error


def is_primary() -> bool:
    """Whether this process writes what the processes share: logs, reports, the config, the demo's data."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier of this name."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def primary_says(flag: bool) -> bool:
    """Process 0's `flag`, on every process: a decision that process 0 alone can make (the workdir's lock)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def everyone(flag: bool) -> bool:
    """Whether `flag` holds on every process: a verdict (such as whether a checkpoint reads) that all processes then
    act on alike, so that none skips a collective call the others make."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.int32(flag)).all())


# Keys in the key-value store of JAX's coordination service: process i waits on FAILURE_KEY.format(i) for another
# process's failure line ('' at its own normal exit), and acknowledges a line under NOTICED_KEY.format(i).
FAILURE_KEY = "emorf_jax/failure/{}"
NOTICED_KEY = "emorf_jax/failure_noticed/{}"
# How long a failing process waits for the others to read its line: process 0 serves the key-value store, so its
# exit would otherwise cut the others off before they read it.
NOTICE_SECONDS = 30
# How long process 0 stays after a failure line was acknowledged (its own or another's): the others end right after
# the exchange, and the runtime aborts any process still running when process 0, the coordination service, exits.
EXIT_GRACE_SECONDS = 5
_WAIT_MS = 3_600_000  # one wait of the watching thread; it waits again after each
# Set once this process announces its own failure: it ends with its own line, not with one another process sends.
_ANNOUNCED = threading.Event()


def _coordination_client():
    """The client of JAX's coordination service, which has no public accessor (orbax reaches it the same way)."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def watch_for_failures(on_failure: Callable[[str], None]) -> None:
    """In a job of several processes, calls `on_failure(line)` from a thread when another process announces that it
    fails (`announce_failure`), so that this process, most likely waiting for the failed one in a collective or an
    orbax barrier, ends with the same line at once rather than at a timeout. `on_failure` must end the process. A
    process that has announced its own failure acknowledges the line and leaves the ending to its announcement."""
    if jax.process_count() == 1:
        return
    client, key = _coordination_client(), FAILURE_KEY.format(jax.process_index())

    def watch() -> None:
        while True:
            try:
                line = client.blocking_key_value_get(key, _WAIT_MS)
                break
            except Exception as error:  # a wait that timed out is renewed; anything else: the job is ending
                if "DEADLINE_EXCEEDED" not in str(error):
                    return
        if line:
            with contextlib.suppress(Exception):  # the failed process has ended without waiting for the notice
                client.key_value_set(NOTICED_KEY.format(jax.process_index()), "1", allow_overwrite=True)
            if not _ANNOUNCED.is_set():
                _outlast_the_others()
                on_failure(line)

    def end_watch() -> None:  # before JAX's own exit handler shuts the client down (atexit runs last-in, first-out)
        with contextlib.suppress(Exception):  # the service is gone already: the watch ends on its own
            client.key_value_set(key, "", allow_overwrite=True)

    threading.Thread(target=watch, name="emorf_jax failure watch", daemon=True).start()
    atexit.register(end_watch)


def announce_failure(line: str) -> None:
    """Tells every other process that this one fails with `line` (their `watch_for_failures` ends them with it), then
    waits up to NOTICE_SECONDS for them to have read it."""
    if jax.process_count() == 1:
        return
    _ANNOUNCED.set()
    client = _coordination_client()
    others = [process for process in range(jax.process_count()) if process != jax.process_index()]
    for process in others:
        try:
            client.key_value_set(FAILURE_KEY.format(process), line, allow_overwrite=True)
        except Exception:  # the service is gone (process 0 ended): nobody is left to tell
            return
    deadline = time.monotonic() + NOTICE_SECONDS
    for process in others:
        with contextlib.suppress(Exception):  # it ended before reading the line, or did not read it in time
            left_ms = max(int((deadline - time.monotonic()) * 1000), 1)
            client.blocking_key_value_get(NOTICED_KEY.format(process), left_ms)
    _outlast_the_others()


def _outlast_the_others() -> None:
    """On process 0, waits EXIT_GRACE_SECONDS: the other processes, which have just read or acknowledged a failure
    line and end at once, must be gone before the coordination service it serves goes."""
    if is_primary():
        time.sleep(EXIT_GRACE_SECONDS)


def check_same_config(config: ml_collections.ConfigDict) -> None:
    """Refuses to run when the processes were started with different configs, naming the processes and fields.

    Each process's config JSON travels to every process (same-shape arrays, as the runtime's gathers require),
    so every process raises the same error and none is left waiting in a collective.
    """
    if jax.process_count() == 1:
        return
    text = np.frombuffer(config.to_json_best_effort(sort_keys=True).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(text.size))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: text.size] = text
    texts = multihost_utils.process_allgather(padded)
    configs = [json.loads(bytes(row[:length]).decode()) for row, length in zip(texts, lengths)]
    differing = {
        process: sorted(run_folder.config_differences(configs[0], other))
        for process, other in enumerate(configs)
        if other != configs[0]
    }
    if differing:
        details = "; ".join(
            f"process {process} differs from process 0 in {', '.join(fields)}" for process, fields in differing.items()
        )
        raise ValueError(
            f"the {len(configs)} processes were started with different configs: {details}; start "
            "every process with the same --config and overrides"
        )


def use_compilation_cache(directory: str, workdir: str) -> None:
    """Points JAX's persistent compilation cache at `directory`, relative to `workdir` unless absolute ('' off), so
    that a resumed or repeated run does not compile again. A JAX_COMPILATION_CACHE_DIR in the environment wins."""
    if directory and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, os.path.expanduser(directory)))


class StopSignals:
    """SIGTERM (a scheduler's preemption notice) or SIGINT (Ctrl-C) asks a run to stop after a step that every
    process agrees on, so that all of them save the same resumable checkpoint and none waits in a collective.

    One process: a handler notes the signal and `should_stop(step)` is true after the step in progress. Several:
    JAX's preemption service (`jax.distributed.initialize` starts it; it owns SIGTERM) spreads the notice to every
    process in the background and picks the step after the furthest any process had reported;
    `multihost_utils.reached_preemption_sync_point` is true at that step on every process. It reads a flag the
    service sets, so asking at every step costs no communication in the training loop. SIGINT is passed on to it
    as a SIGTERM of this process; a second SIGINT interrupts at once. The handlers are in place inside the `with`
    block only: a signal before the first step or during the final report ends the process as usual, and the rerun
    resumes from the last save.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _note(self, signal_number: int, frame) -> None:
        if self.received == signal.SIGINT == signal_number:  # Ctrl-C twice: stop now, without a save
            raise KeyboardInterrupt
        self.received = self.received or signal_number
        if jax.process_count() > 1:
            os.kill(os.getpid(), signal.SIGTERM)  # to the preemption service's own handler

    def __enter__(self) -> "StopSignals":
        noted = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGINT, signal.SIGTERM)
        if threading.current_thread() is not threading.main_thread():
            noted = ()  # Python takes signals in its main thread only: a run in another thread keeps the defaults
        for signal_number in noted:
            self._previous[signal_number] = signal.signal(signal_number, self._note)
        return self

    def __exit__(self, *exc_info) -> None:
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)

    def should_stop(self, step: int) -> bool:
        """Whether the run stops after `step`; true on every process at the same step."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    @property
    def exit_status(self) -> int:
        """The shell's status for death by the signal (143 for SIGTERM, 130 for SIGINT), so that a scheduler sees
        an interrupted job; a process stopped by another's notice reports SIGTERM's."""
        return 128 + (self.received or signal.SIGTERM)
