"""Multi-host data parallelism on JAX's own multi-controller runtime (`jax.distributed`).

Every process runs the same program on its local devices; `jax.pmap`'s axis then spans the devices of all
processes, so gradients, BatchNorm statistics and mixup's global batch are those of the whole job. What this
module adds is what the runtime leaves to the program: starting it, refusing processes that were given different
configs, and a barrier. See docs/architecture.md, "Multi-host training".
"""

import json

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from emorf_jax import checkpoints


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
        process: sorted(checkpoints.config_differences(configs[0], other))
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
