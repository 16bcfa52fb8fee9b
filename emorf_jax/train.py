"""Training and evaluation of any registered model (models/registry.py) on prepared shards: pmapped steps,
mixup, SWA, snapshots, checkpoints.

`train_and_evaluate(config, workdir)` is the whole job on an already prepared dataset; `main.py` parses flags and
`demo.py` makes the demo's data. The recipe (docs/fidelity.md): Adam, the authors' constant / linear-decay /
lr-over-100 learning rate per epoch, mixup over the global batch on device, the authors' BCE on logits with a
positive weight (`config.loss`), an average of the weights kept in the train state (SWA or EMA), snapshot members
saved for ensembles, and a final test report (`report.py`) in the MediaEval metrics next to a constant predictor's
score.
"""

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import jax_utils, traverse_util

from data_prep.reader import PreparedDataset, load_prepared
from emorf_jax import (
    checkpoints,
    distributed,
    ensemble,
    fine_tuning,
    input_pipeline,
    losses,
    report,
    run_folder,
    split_predictions,
    thresholds,
    weight_averaging,
    windowing,
    workdir_lock,
)
from emorf_jax.models import receptive_field, registry


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    average_params: Any  # SWA/EMA average of `params`
    average_count: jax.Array  # weights taken into the average so far


def num_classes(config: ml_collections.ConfigDict, num_tags: int | None = None) -> int:
    """The model's outputs: the prepared data's `num_tags` when the config's `num_classes` is 0 (the tags come from
    the data, so one config serves the 56 real tags and the synthetic data's 9); a nonzero value must equal it."""
    if config.num_classes and num_tags is not None and config.num_classes != num_tags:
        raise ValueError(
            f"the prepared dataset has {num_tags} tags but the config asks for num_classes={config.num_classes}; "
            "set --config.num_classes=0 to follow the data, or prepare the dataset with the config's tag set"
        )
    if not (config.num_classes or num_tags):
        raise ValueError("num_classes is 0 (the prepared data's tag count): give the number of tags")
    return config.num_classes or num_tags


def model_fields(config: ml_collections.ConfigDict, num_tags: int | None = None) -> dict[str, Any]:
    """The model a config asks for, as the registry's name and constructor fields (models/registry.py), with
    `num_classes(config, num_tags)` outputs.

    A CP-ResNet (`model.name` "cp_resnet", the default) reads `max_rf` > 0 as the largest published RF not above
    it; every other model takes the fields of `config.model` besides its name as they are.
    """
    name = config.model.get("name", registry.DEFAULT_MODEL)
    if name != "cp_resnet":
        return {
            "name": name,
            "num_classes": num_classes(config, num_tags),
            **{key: value for key, value in config.model.items() if key != "name"},
        }
    rho = config.model.rho
    if config.model.max_rf > 0:
        rho = receptive_field.rho_for_max_rf(config.model.max_rf)
    return {
        "name": name,
        "num_classes": num_classes(config, num_tags),
        "rho": rho,
        "base_channels": config.model.base_channels,
        "frequency_aware": config.model.frequency_aware,
        "shake_shake": config.model.shake_shake,
        "features_shift": config.model.features_shift,
    }


def create_model(fields: dict[str, Any], *, half_precision: bool = False, axis_name: str | None = None) -> nn.Module:
    return registry.build(fields, dtype=jnp.bfloat16 if half_precision else jnp.float32, bn_axis_name=axis_name)


def epochs_to_steps(epochs: float, steps_per_epoch: float) -> int:
    return int(round(epochs * steps_per_epoch))


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: float) -> optax.Schedule:
    """The authors' schedule, a factor of the learning rate that changes once per epoch e (counted from 0):
    1 while e <= lr_constant_epochs; (end - e) / (end - constant), a linear decay towards 0, while
    e < end = lr_decay_end_epoch; lr_final_factor (lr/100, the authors' SWA learning rate) from e = end on."""
    constant, end = config.lr_constant_epochs, config.lr_decay_end_epoch
    if end <= constant:
        raise ValueError("lr_decay_end_epoch must come after lr_constant_epochs")

    def schedule(step: jax.Array) -> jax.Array:
        epoch = jnp.floor(step / steps_per_epoch)
        factor = jnp.where(
            epoch <= constant, 1.0, jnp.where(epoch < end, (end - epoch) / (end - constant), config.lr_final_factor)
        )
        return config.learning_rate * factor

    return schedule


def epoch_steps(start_epoch: float, every_epochs: float, end_epoch: float, steps_per_epoch: float) -> list[int]:
    """The steps that end epochs start, start + every, ... up to end_epoch, both included (the authors' count):
    each epoch rounded to a step on its own, so that a fractional epoch's rounding cannot add up over the intervals
    and push the last one past the end. Epoch 0 counts as step 1."""
    if every_epochs <= 0:
        raise ValueError(f"the interval must be a positive number of epochs, not {every_epochs}")
    if end_epoch < start_epoch:
        return []
    count = int(np.floor((end_epoch - start_epoch) / every_epochs + 1e-9)) + 1
    epochs = (start_epoch + k * every_epochs for k in range(count))
    return sorted({max(epochs_to_steps(epoch, steps_per_epoch), 1) for epoch in epochs})


def averaging_schedule(config: ml_collections.ConfigDict, steps_per_epoch: float) -> weight_averaging.AveragingSchedule:
    """SWA at the steps that end epochs start_epoch, start + every_epochs, ..., num_epochs; EMA from start_epoch."""
    average = config.weight_average
    swa_steps = ()
    if average.kind == "swa":
        swa_steps = tuple(epoch_steps(average.start_epoch, average.every_epochs, config.num_epochs, steps_per_epoch))
    return weight_averaging.AveragingSchedule(
        kind=average.kind,
        swa_steps=swa_steps,
        start_step=max(epochs_to_steps(average.start_epoch, steps_per_epoch), 1),
        ema_decay=average.ema_decay,
    )


def snapshot_steps(config: ml_collections.ConfigDict, steps_per_epoch: float, total_steps: int) -> list[int]:
    """Steps whose weights are kept as snapshot-ensemble members: those that end epochs start_epoch,
    start + every_epochs, ... up to the last epoch, within `total_steps`."""
    snapshots = config.snapshots
    steps = epoch_steps(snapshots.start_epoch, snapshots.every_epochs, config.num_epochs, steps_per_epoch)
    return [step for step in steps if step <= total_steps]


def optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule, head: dict[tuple[str, ...], int] | None = None
) -> optax.GradientTransformation:
    """Adam on `schedule`. When fine-tuning freezes the trunk or gives it a smaller learning rate, the parameters
    outside the `head` (fine_tuning.head_axes) get no update or `trunk_learning_rate_factor` times the step."""
    if not config.freeze_trunk and config.trunk_learning_rate_factor == 1:
        return optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2)
    if head is None:
        raise ValueError("a frozen or slower trunk needs the head's variables (fine_tuning.head_axes)")
    factor = config.trunk_learning_rate_factor
    trunk = (
        optax.set_to_zero()
        if config.freeze_trunk
        else optax.adam(lambda step: schedule(step) * factor, b1=config.adam_b1, b2=config.adam_b2)
    )
    return optax.multi_transform(
        {fine_tuning.HEAD: optax.adam(schedule, b1=config.adam_b1, b2=config.adam_b2), fine_tuning.TRUNK: trunk},
        functools.partial(fine_tuning.parameter_groups, head=head),
    )


def initial_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    input_shape: tuple[int, ...],
    variables: dict[str, Any] | None = None,
) -> TrainState:
    """The state at step 0: the model's initialisation, or the given `variables` (a fine-tuning run's)."""
    if variables is None:
        variables = jax.jit(functools.partial(model.init, train=False))(rng, jnp.zeros(input_shape, jnp.float32))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        average_params=params,
        average_count=jnp.zeros((), jnp.int32),
    )


def starting_state(
    config: ml_collections.ConfigDict,
    workdir: str,
    prepared: PreparedDataset,
    model: nn.Module,
    tx: optax.GradientTransformation,
) -> TrainState:
    """The state a run starts from: its latest resumable checkpoint; else, at step 0, the model's initialisation,
    with the variables of `config.init_from` mapped onto it (fine_tuning.py; one log line says what it took)."""
    rng = jax.random.PRNGKey(config.seed)
    input_shape = input_pipeline.model_input_shape(prepared, config.input.crop_frames)
    state = initial_state(model, tx, rng, input_shape)
    restored = checkpoints.restore_resumable(workdir, target=state)
    if restored is not None:
        logging.info("Resuming from step %d", int(restored.step))
        return restored
    if not config.init_from:
        return state
    variables, summary = fine_tuning.initial_variables(
        config.init_from,
        {"params": state.params, "batch_stats": state.batch_stats},
        model_fields(config, len(prepared.tags)),
        prepared.tags,
        input_shape,
    )
    logging.info("%s", summary)
    return initial_state(model, tx, rng, input_shape, variables=variables)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    mixup_alpha: float,
    averaging: weight_averaging.AveragingSchedule,
    learning_rate: optax.Schedule,
    normalisation: tuple[jax.Array, jax.Array],
    pos_weight: float,
    mixup_reduction: str,
    frozen_trunk: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on this device's share of the global batch of stored crops, normalised here by the
    (mean, std) per mel band of `normalisation` (run under pmap with axis 'batch'), on `losses.training_loss` with
    a run's `config.loss` (`pos_weight`, `mixup_reduction`). With `frozen_trunk` the model runs in evaluation mode:
    every BatchNorm normalises with, and keeps, its loaded statistics (docs/training.md, "Fine-tuning")."""
    rng = jax.random.fold_in(rng, state.step)
    mixup_rng, shake_rng = jax.random.split(rng)
    shift_rng = jax.random.fold_in(mixup_rng, 1)  # the frequency roll: one per block for the whole global batch
    shake_rng = jax.random.fold_in(shake_rng, jax.lax.axis_index("batch"))  # other examples, other α and β
    dropout_rng = jax.random.fold_in(shake_rng, 1)  # the baselines' dropout (models/vggish.py, crnn.py)
    inputs, targets = windowing.model_input(batch["spectrogram"], *normalisation), batch["labels"]
    mixed = None
    if mixup_alpha > 0:
        mixed = losses.mixup(mixup_rng, inputs, targets, mixup_alpha, axis_name="batch")
        inputs = mixed.inputs

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        rngs = {"shake": shake_rng, "dropout": dropout_rng, "shift": shift_rng}
        if frozen_trunk:
            logits, batch_stats = model.apply(variables, inputs, train=False, rngs=rngs), state.batch_stats
        else:
            logits, updates = model.apply(variables, inputs, train=True, rngs=rngs, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        loss = losses.training_loss(
            logits.astype(jnp.float32), targets, mixed, pos_weight=pos_weight, mixup_reduction=mixup_reduction
        )
        return loss, batch_stats

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, "batch")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    average_params, average_count = weight_averaging.update_average(
        state.average_params, params, state.average_count, step, averaging
    )
    new_state = state.replace(
        step=step,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        average_params=average_params,
        average_count=average_count,
    )
    return new_state, {"loss": jax.lax.pmean(loss, "batch"), "learning_rate": learning_rate(state.step)}


def batch_stats_step(
    params: Any,
    batch_stats: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: nn.Module,
    normalisation: tuple[jax.Array, jax.Array],
) -> Any:
    """This batch's BatchNorm statistics for `params`: `model` has BatchNorm momentum 0, so the incoming
    `batch_stats` only give the structure. Its random layers draw from `rng` as `train_step`'s do: the frequency
    roll once for the global batch (the same `rng` on every device), Shake-Shake's coefficients per device."""
    shake_rng, dropout_rng, shift_rng = jax.random.split(rng, 3)
    shake_rng = jax.random.fold_in(shake_rng, jax.lax.axis_index("batch"))
    inputs = windowing.model_input(batch["spectrogram"], *normalisation)
    _, updates = model.apply(
        {"params": params, "batch_stats": batch_stats},
        inputs,
        train=True,
        rngs={"shake": shake_rng, "dropout": dropout_rng, "shift": shift_rng},
        mutable=["batch_stats"],
    )
    return updates["batch_stats"]


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the run's prepared dataset lies: `dataset.data_dir`, or `<workdir>/data` (the demo's own data)."""
    return config.dataset.data_dir or os.path.join(workdir, "data")


def load_dataset(config: ml_collections.ConfigDict, workdir: str) -> PreparedDataset:
    return load_prepared(data_dir(config, workdir), config.dataset.config_name, config.dataset.split_index)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Errors that must stop a run before any data is read or compiled."""
    devices = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % devices:
            raise ValueError(
                f"{name} {config[name]} is not divisible by the {devices} devices; choose a multiple of {devices}"
            )
    if config.selection_metric not in ("loss", "PR-AUC-macro", "ROC-AUC-macro"):
        raise ValueError(
            f"selection_metric must be 'loss', 'PR-AUC-macro' or 'ROC-AUC-macro', not {config.selection_metric!r}"
        )
    if config.loss.mixup_reduction not in losses.MIXUP_REDUCTIONS:
        raise ValueError(
            f"loss.mixup_reduction must be one of {losses.MIXUP_REDUCTIONS}, not {config.loss.mixup_reduction!r}"
        )
    if config.loss.pos_weight <= 0:
        raise ValueError(f"loss.pos_weight must be positive, not {config.loss.pos_weight}")
    if config.trunk_learning_rate_factor <= 0:
        raise ValueError(
            f"trunk_learning_rate_factor must be positive, not {config.trunk_learning_rate_factor}; "
            "--config.freeze_trunk=True trains the head alone"
        )
    fine_tuning_fields = [
        f"--config.{name}={config[name]}"
        for name, plain in (("freeze_trunk", False), ("trunk_learning_rate_factor", 1))
        if config[name] != plain
    ]
    if fine_tuning_fields and not config.init_from:
        raise ValueError(
            f"{' and '.join(fine_tuning_fields)} fine-tune a trained trunk: give its checkpoint with "
            "--config.init_from=CHECKPOINT"
        )
    if len(fine_tuning_fields) > 1:
        raise ValueError("freeze_trunk trains the head alone: leave trunk_learning_rate_factor at 1 with it")


def check_run(config: ml_collections.ConfigDict, workdir: str) -> PreparedDataset:
    """Every check a run makes before it writes anything in its workdir (a mistaken command leaves nothing behind,
    so the corrected one can use the same --workdir); returns the prepared dataset."""
    distributed.check_same_config(config)
    check_config(config)
    run_folder.refuse_checkpoint_folder(workdir)
    run_folder.compare_config(workdir, config)
    prepared = load_dataset(config, workdir)
    num_classes(config, len(prepared.tags))
    if config.init_from and not checkpoints.has_resumable(workdir):
        fine_tuning.check(
            config.init_from,
            model_fields(config, len(prepared.tags)),
            prepared.tags,
            input_pipeline.model_input_shape(prepared, config.input.crop_frames),
        )
    return prepared


def warn_about_missing_tracks(prepared: PreparedDataset) -> None:
    """Tracks of the split's TSVs that data preparation could not store are left out of every figure: say so."""
    for part in ("validation", "test"):
        missing = prepared.missing(part)
        if missing:
            consequence = "; no MediaEval submission can be written" if part == "test" else ""
            logging.warning(
                "%d of the %d %s tracks are not in the prepared data (e.g. %s: %s); %s figures cover the other %d%s; "
                "the reasons are in %s",
                len(missing),
                len(prepared.tsv_track_ids[part]),
                part,
                missing[0]["track_id"],
                missing[0]["kind"],
                part,
                len(prepared.parts[part]),
                consequence,
                prepared.failures_report,
            )


def checkpoint_meta(
    fields: dict[str, Any],
    prepared: PreparedDataset,
    config: ml_collections.ConfigDict,
    kind: str,
    step: int,
    steps_per_epoch: float,
) -> dict[str, Any]:
    """What a checkpoint needs to be used without the training config, and what it was trained on."""
    return {
        "format": "emorf_jax.checkpoint/2",
        "kind": kind,
        "step": int(step),
        "epoch": step / steps_per_epoch,
        "model": dict(fields),
        "tags": list(prepared.tags),
        "features": dict(prepared.features),
        "normalisation": {"mean": np.asarray(prepared.mean).tolist(), "std": np.asarray(prepared.std).tolist()},
        "window_frames": int(config.input.eval_window_frames),
        "dataset": {
            "config_name": config.dataset.config_name,
            "split_index": config.dataset.split_index,
            "training_tracks": len(prepared.parts["train"]),
            "crop_frames": int(config.input.crop_frames),
            "batch_size": int(config.batch_size),
        },
    }


def replicate_as_step_outputs(tree: Any) -> Any:
    """`tree` on every local device, laid out as the pmapped train step returns its state: from flax's `replicate`
    alone (another mesh axis name) the step would be traced, lowered and compiled again at its second call."""
    return jax.pmap(lambda leaves: leaves, axis_name="batch")(jax_utils.replicate(tree))


class _Run:
    """The pieces of one training run that the loop and the evaluations share."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, prepared: PreparedDataset):
        self.config, self.workdir, self.prepared = config, workdir, prepared
        self.fields = model_fields(config, len(prepared.tags))
        self.model = create_model(self.fields, half_precision=config.half_precision, axis_name="batch")
        self.steps_per_epoch = input_pipeline.steps_per_epoch(prepared, config.batch_size)
        self.total_steps = epochs_to_steps(config.num_epochs, self.steps_per_epoch)
        self.schedule = learning_rate_schedule(config, self.steps_per_epoch)
        self.input_shape = input_pipeline.model_input_shape(prepared, config.input.crop_frames)
        head = fine_tuning.head_axes(self.fields, self.input_shape) if config.init_from else None
        self.tx = optimizer(config, self.schedule, head)
        self.averaging = averaging_schedule(config, self.steps_per_epoch)
        normalisation = (prepared.mean, prepared.std)
        self.p_train_step = jax.pmap(
            functools.partial(
                train_step,
                model=self.model,
                tx=self.tx,
                mixup_alpha=config.mixup_alpha,
                averaging=self.averaging,
                learning_rate=self.schedule,
                normalisation=normalisation,
                pos_weight=config.loss.pos_weight,
                mixup_reduction=config.loss.mixup_reduction,
                frozen_trunk=config.freeze_trunk,
            ),
            axis_name="batch",
            donate_argnums=(0,),
        )
        stats_model = self.model.clone(bn_momentum=0.0)
        self.p_batch_stats = jax.pmap(
            functools.partial(batch_stats_step, model=stats_model, normalisation=normalisation),
            axis_name="batch",
            in_axes=(0, 0, 0, None),
        )
        self.predictor = split_predictions.Predictor(
            self.model.clone(bn_axis_name=None),
            prepared,
            window_frames=config.input.eval_window_frames,
            batch_size=config.eval_batch_size,
        )

    def meta(self, kind: str, step: int) -> dict[str, Any]:
        return checkpoint_meta(self.fields, self.prepared, self.config, kind, step, self.steps_per_epoch)

    def train_batches(self, start_step: int, seed: int) -> Iterator[Any]:
        batches = input_pipeline.train_batches(
            self.prepared,
            global_batch_size=self.config.batch_size,
            crop_frames=self.config.input.crop_frames,
            max_time_shift=self.config.input.max_time_shift,
            seed=seed,
            start_step=start_step,
            read_threads=self.config.input.read_threads,
            verify_checksums=self.config.dataset.verify_checksums,
        )
        return jax_utils.prefetch_to_device(batches, 2)

    def averaged_variables(self, state: TrainState) -> dict[str, Any]:
        """The averaged weights with BatchNorm statistics re-estimated on training batches (host-local); a frozen
        trunk keeps the loaded statistics it was trained with."""
        if self.config.freeze_trunk:
            batch_stats = state.batch_stats
        else:
            num_batches = self.config.bn_reestimate_batches or int(np.ceil(self.steps_per_epoch))
            batches = self.train_batches(start_step=0, seed=self.config.seed + 1)
            batch_stats = weight_averaging.reestimate_batch_stats(
                lambda params, batch, rng: self.p_batch_stats(params, state.batch_stats, batch, rng),
                state.average_params,
                batches,
                num_batches,
                rng=jax.random.PRNGKey(self.config.seed + 1),  # the seed of the re-estimation's batches
            )
        return {
            "params": jax_utils.unreplicate(state.average_params),
            "batch_stats": jax_utils.unreplicate(batch_stats),
        }


def current_variables(state: TrainState) -> dict[str, Any]:
    return {"params": jax_utils.unreplicate(state.params), "batch_stats": jax_utils.unreplicate(state.batch_stats)}


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped the run after `step`, which is saved as its latest resumable checkpoint: the same
    command resumes there. `exit_status` is the shell's for death by that signal (143 SIGTERM, 130 SIGINT)."""

    def __init__(self, step: int, exit_status: int):
        super().__init__(f"stopped by a signal after step {step}, saved to resume")
        self.step, self.exit_status = step, exit_status


class RunReport(dict):
    """A run's test summary (model name: figures, as `report.run_summary` makes it) and the final checkpoints left
    out of it because they cannot be read (`left_out`, path: why), which main.py's exit status reports."""

    def __init__(self, summary: dict[str, dict], left_out: dict[str, str]):
        super().__init__(summary)
        self.left_out = left_out


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, prepared: PreparedDataset | None = None
) -> RunReport:
    """Trains (or resumes) the run in `workdir` to its last step and returns the final test report, with the
    damaged final checkpoints it left out (`RunReport.left_out`).

    `prepared` is what `check_run` returned, if the caller already ran it; nothing is written in the workdir before
    those checks pass. The workdir is then locked (`workdir_lock`: a second live run there is refused with
    `WorkdirLocked`). SIGTERM or SIGINT during training ends the step in progress, saves it as a resumable
    checkpoint and raises `TrainingStopped`: a rerun loses no step. In a multi-process job (main.py's
    --distributed) every process calls this with the same config and workdir; each reads its share of every batch,
    process 0 alone writes the config, the logs and the report, and all stop at the same step.
    """
    if prepared is None:
        prepared = check_run(config, workdir)
    with _locked(workdir):
        run_folder.record_config(workdir, config)
        return _train(config, workdir, prepared)


@contextlib.contextmanager
def _locked(workdir: str) -> Iterator[None]:
    """The workdir's lock, held by process 0 for the job; every process learns whether it got it."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if distributed.is_primary():
            try:
                stack.enter_context(workdir_lock.hold(workdir))
            except workdir_lock.WorkdirLocked as error:
                refusal = error
        if not distributed.primary_says(refusal is None):
            raise refusal or workdir_lock.WorkdirLocked(f"process 0 found the workdir {workdir} in use by another run")
        yield


def _train(config: ml_collections.ConfigDict, workdir: str, prepared: PreparedDataset) -> RunReport:
    warn_about_missing_tracks(prepared)
    run = _Run(config, workdir, prepared)
    state = starting_state(config, workdir, prepared, run.model.clone(bn_axis_name=None), run.tx)
    start_step = int(state.step)
    state = replicate_as_step_outputs(state)
    latest = checkpoints.open_manager(workdir, checkpoints.LATEST)

    # clu's writers bring TensorFlow (for TensorBoard's event files): only a run loads them, so that the step and
    # model functions above import without it (the step benchmark runs where TensorFlow is not installed).
    from clu import metric_writers, periodic_actions

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
        writer.write_hparams(traverse_util.flatten_dict(config.to_dict(), sep="."))
    report_progress = periodic_actions.ReportProgress(num_train_steps=run.total_steps, writer=writer)
    snapshots = checkpoints.open_manager(workdir, checkpoints.SNAPSHOTS)
    swa = checkpoints.open_manager(workdir, checkpoints.SWA)
    best = checkpoints.open_manager(workdir, checkpoints.BEST)
    snapshot_at = set(snapshot_steps(config, run.steps_per_epoch, run.total_steps))
    eval_every = max(epochs_to_steps(config.eval_every_epochs, run.steps_per_epoch), 1)
    rng = jax_utils.replicate(jax.random.PRNGKey(config.seed + 2))
    logging.info(
        "%d training tracks, %.2f steps per epoch, %d steps in all, snapshots at %s",
        len(prepared.parts["train"]),
        run.steps_per_epoch,
        run.total_steps,
        sorted(snapshot_at),
    )

    batches = run.train_batches(start_step, config.seed)
    train_losses = []
    with distributed.StopSignals() as signals:
        for step in range(start_step + 1, run.total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = run.p_train_step(state, next(batches), rng)
            report_progress(step)
            train_losses.append(step_metrics["loss"])
            if step % config.log_every_steps == 0 or step == run.total_steps:
                values = jax.device_get(jax_utils.unreplicate(step_metrics))
                losses = jax.device_get(train_losses)
                writer.write_scalars(
                    step,
                    {
                        "train_loss": float(np.mean([loss[0] for loss in losses])),
                        "learning_rate": float(values["learning_rate"]),
                        "epoch": step / run.steps_per_epoch,
                    },
                )
                train_losses = []
            if step in snapshot_at:
                checkpoints.save(snapshots, step, current_variables(state), run.meta("snapshot", step))
            if step % eval_every == 0 or step == run.total_steps:
                _evaluate_and_select(run, state, step, writer, best, swa)
            stopping = signals.should_stop(step)
            if stopping or step % config.checkpoint_every_steps == 0 or step == run.total_steps:
                checkpoints.save(latest, step, jax_utils.unreplicate(state), run.meta("latest", step))
            if stopping:
                writer.close()
                logging.warning(
                    "Stopped by a signal after step %d of %d, saved in %s; the same command resumes from there",
                    step,
                    run.total_steps,
                    checkpoints.step_path(latest, step),
                )
                raise TrainingStopped(step, signals.exit_status)
    writer.flush()
    report = final_report(run, state, latest, snapshots, best, swa)
    writer.close()
    return report


def _evaluate_and_select(run: _Run, state: TrainState, step: int, writer, best, swa) -> None:
    """Validation metrics of the current (and averaged) weights; keeps the best and the latest averaged model."""
    scores = {}
    variables = current_variables(state)
    validation = run.predictor.evaluate(variables, "validation", pos_weight=run.config.loss.pos_weight)
    scores.update({f"val_{k}": v for k, v in validation.items()})
    selection = validation[run.config.selection_metric]
    score = -selection if run.config.selection_metric == "loss" else selection
    checkpoints.save(best, step, variables, run.meta("best", step) | {"validation": validation}, score=score)
    if int(jax_utils.unreplicate(state.average_count)) > 0:
        averaged = run.averaged_variables(state)
        averaged_validation = run.predictor.evaluate(averaged, "validation", pos_weight=run.config.loss.pos_weight)
        scores.update({f"val_average_{k}": v for k, v in averaged_validation.items()})
        checkpoints.save(swa, step, averaged, run.meta("swa", step) | {"validation": averaged_validation})
    writer.write_scalars(step, scores)  # its logging writer prints them on the console too


def final_report(run: _Run, state: TrainState, latest, snapshots, best, swa) -> RunReport:
    """Test figures of the final, selected, averaged and snapshot-ensemble models, thresholds from validation.

    Writes `report/` (`report.write_run_report`): a folder per model and `test_report.json`, the summary that is
    returned and printed. Each model's thresholds also go into the meta of its checkpoint, and each snapshot's own
    (from its own validation predictions) into its meta, so that a checkpoint alone can decide tags
    (`thresholds.write`). Every process predicts (the predictions are collective); process 0 alone
    writes and prints. A `best/`, `swa/` or snapshot checkpoint that cannot be read is named in one line and left
    out: the report, and the snapshot ensemble of the intact members, are made from the others.
    """
    left_out = {}
    models = {"final": current_variables(state)}
    saved = {"final": checkpoints.step_path(latest, latest.latest_step())}  # each model's checkpoint
    for name, manager, step in (("selected", best, best.best_step()), ("swa", swa, swa.latest_step())):
        variables = None if step is None else _final_checkpoint(manager, step, left_out)
        if variables is not None:
            models[name] = variables
            saved[name] = checkpoints.step_path(manager, step)
    predictions = {name: _predict_splits(run, variables, report.SPLITS) for name, variables in models.items()}
    members = snapshots.all_steps()[-run.config.snapshots.ensemble_size :]
    snapshot_predictions = {}  # the ensemble's members on both splits, earlier snapshots for their thresholds only
    for step in snapshots.all_steps():
        variables = _final_checkpoint(snapshots, step, left_out)
        if variables is not None:
            splits = report.SPLITS if step in members else ("validation",)
            snapshot_predictions[step] = _predict_splits(run, variables, splits)
    members = [step for step in members if step in snapshot_predictions]
    if members:
        predictions[f"snapshot_ensemble_{len(members)}"] = ensemble.average_members(
            [snapshot_predictions[step] for step in members]
        )
    reports = {
        name: report.model_report(name, run.prepared.tags, by_split["validation"], by_split["test"])
        for name, by_split in predictions.items()
    }
    stored_thresholds = {path: reports[name].thresholds for name, path in saved.items()} | {
        checkpoints.step_path(snapshots, step): report.validation_thresholds(by_split["validation"], run.prepared.tags)
        for step, by_split in snapshot_predictions.items()
    }
    summary = report.run_summary(reports)
    if distributed.is_primary():
        _remove_models_left_out(run.workdir, reports)
        report.write_run_report(run.workdir, reports, run.prepared.tsv_track_ids["test"])
        for path, values in stored_thresholds.items():
            thresholds.write(path, run.prepared.tags, values)
        print(report.format_summary(summary))
    return RunReport(summary, left_out)


def _final_checkpoint(manager, step: int, left_out: dict[str, str]) -> dict[str, Any] | None:
    """The variables of a checkpoint the final report scores, or None when a process cannot read them: then one line
    names it and it joins `left_out`. Every process reaches the same verdict, so all make the same predictions."""
    path = checkpoints.step_path(manager, step)
    try:
        variables, reason = checkpoints.restore(manager, step)[0], None
    except Exception as error:  # whatever orbax or tensorstore raise for a missing or truncated file
        variables, reason = None, f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    if distributed.everyone(reason is None):
        return variables
    left_out[path] = reason or "another process cannot read it"
    logging.warning("Left out of the report: the checkpoint %s cannot be read (%s)", path, left_out[path])
    return None


def _remove_models_left_out(workdir: str, reports: dict[str, Any]) -> None:
    """Removes the folders of an earlier report's models that this report has not (a checkpoint damaged since, a
    smaller snapshot ensemble), so that `report/` holds the models of its `test_report.json` only."""
    summary_path = os.path.join(workdir, report.RUN_REPORT_DIR, report.RUN_SUMMARY)
    if not os.path.exists(summary_path):
        return
    with open(summary_path) as f:
        earlier = set(json.load(f))
    for name in sorted(earlier - set(reports)):
        folder = os.path.join(workdir, report.RUN_REPORT_DIR, name)
        if os.path.isdir(folder):  # the summary's constant predictor has none
            shutil.rmtree(folder)


def _predict_splits(
    run: _Run, variables: dict[str, Any], splits: tuple[str, ...]
) -> dict[str, split_predictions.Predictions]:
    return {split: run.predictor.predict(variables, split) for split in splits}
