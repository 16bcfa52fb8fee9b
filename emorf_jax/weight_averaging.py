"""Stochastic weight averaging (the authors' equal-weight running average) or an EMA of the parameters.

The average is updated inside the train step with `optax.incremental_update`; its BatchNorm statistics are not
averaged but re-estimated on training batches before the averaged weights are evaluated or saved, as the
authors did after every SWA update (PyTorch's `bn_update`: a cumulative average of per-batch statistics).
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class AveragingSchedule:
    """When the average takes in the current weights, counted in optimiser steps (1-based: step s made them).

    SWA lists its steps rather than an interval in steps: an epoch of 994.9 steps rounded to whole steps would drift
    by a fraction of a step per interval and lose the last update (`train.averaging_schedule` makes the list)."""

    kind: str  # "swa", "ema" or "none"
    swa_steps: tuple[int, ...] = ()  # SWA only: the steps whose weights it takes in, increasing
    start_step: int = 1  # EMA only: the first step it takes in, then every step
    ema_decay: float = 0.999  # EMA only

    def __post_init__(self):
        if self.kind not in ("swa", "ema", "none"):
            raise ValueError(f"weight_average.kind must be 'swa', 'ema' or 'none', not {self.kind!r}")
        if any(step < 1 for step in self.swa_steps) or list(self.swa_steps) != sorted(set(self.swa_steps)):
            raise ValueError(f"SWA steps must be increasing steps from 1 on, got {self.swa_steps}")


def update_average(
    average: Any, params: Any, count: jax.Array, step: jax.Array, schedule: AveragingSchedule
) -> tuple[Any, jax.Array]:
    """The average after optimiser step `step` (1-based) produced `params`; `count` = weights averaged so far.

    SWA: at each of `swa_steps`, new = old + (w - old) / (count + 1).
    EMA: from start_step on, every step, new = decay * old + (1 - decay) * w. Either way the first update copies w.
    """
    if schedule.kind == "none":
        return average, count
    if schedule.kind == "swa":
        due = jnp.isin(step, jnp.asarray(schedule.swa_steps, jnp.int32))
        step_size = 1.0 / (count + 1).astype(jnp.float32)
    else:
        due = step >= schedule.start_step
        step_size = jnp.where(count == 0, 1.0, 1.0 - schedule.ema_decay)
    step_size = jnp.where(due, step_size, 0.0)
    return optax.incremental_update(params, average, step_size), count + due.astype(count.dtype)


@jax.jit
def _tree_sum(total: Any, stats: Any) -> Any:
    return jax.tree.map(jnp.add, total, stats)


@jax.jit
def _tree_mean(total: Any, count: jax.Array) -> Any:
    return jax.tree.map(lambda x: x / count, total)


def reestimate_batch_stats(
    batch_stats_fn: Callable[[Any, Any, jax.Array], Any],
    params: Any,
    batches: Iterator[Any],
    num_batches: int,
    rng: jax.Array,
) -> Any:
    """Equal-weight mean over `num_batches` batches of the BatchNorm statistics that `params` produce.

    `batch_stats_fn(params, batch, key)` returns one batch's statistics (a model whose BatchNorm momentum is 0 run
    in training mode, its random layers drawn from `key`); it may be pmapped, in which case `params` and the result
    are replicated. Batch i gets the key `fold_in(rng, i)`: like training's forward passes, every batch draws
    its own frequency roll and Shake-Shake coefficients, and the same `rng` gives the same statistics.

    Each batch's statistics join the sum in one computation, dispatched once the sum before it is done: a host far
    ahead of XLA's CPU runtime with several devices deadlocks it (docs/training.md, "Computations in flight").
    """
    if num_batches < 1:
        raise ValueError(f"BatchNorm re-estimation needs at least one batch, got {num_batches}")
    total = None
    for index, batch in zip(range(num_batches), batches):
        stats = batch_stats_fn(params, batch, jax.random.fold_in(rng, index))
        total = stats if total is None else _tree_sum(jax.block_until_ready(total), stats)
    return _tree_mean(total, num_batches)
