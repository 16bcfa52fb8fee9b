"""Training and evaluation of a CP-ResNet on prepared shards: pmapped steps, mixup, SWA, snapshots, checkpoints.

`train_and_evaluate(config, workdir)` is the whole job; `main.py` only parses flags. The recipe is DESIGN.md §4:
Adam, constant-then-linear-decay learning rate, mixup on device, BCE on logits, an average of the weights kept in
the train state (SWA or EMA), snapshot members saved for ensembles, and a final test report in the MediaEval
metrics next to a constant predictor's score.
"""

from collections.abc import Iterator
import functools
import json
import os
from typing import Any

from absl import logging
from clu import metric_writers, periodic_actions
import flax
from flax import jax_utils, traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data_prep import build as data_build
from data_prep import synthetic
from data_prep.builder import PreparedDataset, load_prepared
from emorf_jax import checkpoints, ensemble, inference, input_pipeline, metrics, weight_averaging
from emorf_jax.models import CPResNet, receptive_field


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    average_params: Any  # SWA/EMA average of `params`
    average_count: jax.Array  # weights taken into the average so far


def model_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The CPResNet fields a config asks for (`max_rf` > 0 picks the largest published RF not above it)."""
    rho = config.model.rho
    if config.model.max_rf > 0:
        rho = receptive_field.rho_for_max_rf(config.model.max_rf)
    return {"num_classes": config.num_classes, "rho": rho, "base_channels": config.model.base_channels,
            "frequency_aware": config.model.frequency_aware, "shake_shake": config.model.shake_shake}


def create_model(fields: dict[str, Any], *, half_precision: bool = False, axis_name: str | None = None
                 ) -> CPResNet:
    return CPResNet(**fields, dtype=jnp.bfloat16 if half_precision else jnp.float32, bn_axis_name=axis_name)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Constant, then a linear decay to lr * final_factor, then constant there (the authors' linear rampdown)."""
    constant_steps = int(round(config.lr_constant_epochs * steps_per_epoch))
    decay_end = int(round(config.lr_decay_end_epoch * steps_per_epoch))
    if decay_end < constant_steps:
        raise ValueError("lr_decay_end_epoch must not come before lr_constant_epochs")
    final = config.learning_rate * config.lr_final_factor
    return optax.join_schedules(
        [optax.constant_schedule(config.learning_rate),
         optax.linear_schedule(config.learning_rate, final, max(decay_end - constant_steps, 1)),
         optax.constant_schedule(final)],
        boundaries=[constant_steps, decay_end])


def averaging_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int
                       ) -> weight_averaging.AveragingSchedule:
    return weight_averaging.AveragingSchedule(
        kind=config.weight_average.kind,
        start_step=max(int(round(config.weight_average.start_epoch * steps_per_epoch)), 1),
        every_steps=max(int(round(config.weight_average.every_epochs * steps_per_epoch)), 1),
        ema_decay=config.weight_average.ema_decay)


def snapshot_steps(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> list[int]:
    """Steps whose weights are kept as snapshot-ensemble members: from start_epoch every every_epochs."""
    start = int(round(config.snapshots.start_epoch * steps_per_epoch))
    every = max(int(round(config.snapshots.every_epochs * steps_per_epoch)), 1)
    return [step for step in range(max(start, 1), total_steps + 1, every)]


def initial_state(model: CPResNet, tx: optax.GradientTransformation, rng: jax.Array,
                  input_shape: tuple[int, ...]) -> TrainState:
    variables = jax.jit(functools.partial(model.init, train=False))(rng, jnp.zeros(input_shape, jnp.float32))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                      opt_state=tx.init(params), average_params=params, average_count=jnp.zeros((), jnp.int32))


def mixup(rng: jax.Array, inputs: jax.Array, targets: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
    """Per-example λ ~ Beta(α, α) made ≥ 0.5, mixed with a permutation of the batch (inputs and targets).

    BCE is linear in its target, so the mixed target gives exactly λ·BCE(y) + (1-λ)·BCE(y_perm).
    """
    lambda_rng, permutation_rng = jax.random.split(rng)
    lam = jax.random.beta(lambda_rng, alpha, alpha, (inputs.shape[0],))
    lam = jnp.maximum(lam, 1.0 - lam)
    permutation = jax.random.permutation(permutation_rng, inputs.shape[0])
    mixed_inputs = lam[:, None, None, None] * inputs + (1 - lam[:, None, None, None]) * inputs[permutation]
    mixed_targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[permutation]
    return mixed_inputs, mixed_targets


def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, model: CPResNet,
               tx: optax.GradientTransformation, mixup_alpha: float,
               averaging: weight_averaging.AveragingSchedule, learning_rate: optax.Schedule
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on this device's share of the global batch (run under pmap with axis 'batch')."""
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index("batch"))
    mixup_rng, shake_rng = jax.random.split(rng)
    inputs, targets = batch["spectrogram"], batch["labels"]
    if mixup_alpha > 0:
        inputs, targets = mixup(mixup_rng, inputs, targets, mixup_alpha)

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, inputs, train=True,
                                      rngs={"shake": shake_rng}, mutable=["batch_stats"])
        loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets).mean()
        return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, "batch")
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    average_params, average_count = weight_averaging.update_average(
        state.average_params, params, state.average_count, step, averaging)
    new_state = state.replace(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              average_params=average_params, average_count=average_count)
    return new_state, {"loss": jax.lax.pmean(loss, "batch"), "learning_rate": learning_rate(state.step)}


def batch_stats_step(params: Any, batch_stats: Any, batch: dict[str, jax.Array], *, model: CPResNet) -> Any:
    """This batch's BatchNorm statistics for `params`: `model` has BatchNorm momentum 0, so the incoming
    `batch_stats` only give the structure."""
    _, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["spectrogram"], train=True,
                             rngs={"shake": jax.random.PRNGKey(0)}, mutable=["batch_stats"])
    return updates["batch_stats"]


def load_or_make_dataset(config: ml_collections.ConfigDict, workdir: str) -> PreparedDataset:
    """The prepared shards; for the embedded demo, a synthetic MTG-Jamendo and its shards made in the workdir."""
    data_dir = config.dataset.data_dir or os.path.join(workdir, "data")
    load = functools.partial(load_prepared, data_dir, config.dataset.config_name, config.dataset.split_index)
    try:
        return load()
    except FileNotFoundError:
        if config.dataset.synthetic_tracks <= 0:
            raise
    root = os.path.join(workdir, "synthetic")
    if not os.path.isdir(os.path.join(root, "audio")):
        logging.info("Making a synthetic MTG-Jamendo of %d tracks in %s", config.dataset.synthetic_tracks, root)
        synthetic.make_synthetic(root, num_tracks=config.dataset.synthetic_tracks,
                                 seed=config.dataset.synthetic_seed)
    data_build.build_dataset(os.path.join(root, "audio"), os.path.join(root, "data"), data_dir,
                             config_name=config.dataset.config_name, split_index=config.dataset.split_index,
                             workers=config.dataset.workers)
    return load()


def check_config(config: ml_collections.ConfigDict) -> None:
    """Errors that must stop a run before any data is read or compiled."""
    devices = jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % devices:
            raise ValueError(f"{name} {config[name]} is not divisible by the {devices} devices; choose a multiple "
                             f"of {devices}")
    if config.selection_metric not in ("loss", "PR-AUC-macro", "ROC-AUC-macro"):
        raise ValueError(f"selection_metric must be 'loss', 'PR-AUC-macro' or 'ROC-AUC-macro', "
                         f"not {config.selection_metric!r}")


def check_dataset(config: ml_collections.ConfigDict, prepared: PreparedDataset) -> None:
    if len(prepared.tags) != config.num_classes:
        raise ValueError(
            f"the prepared dataset has {len(prepared.tags)} tags ({', '.join(prepared.tags[:5])}, ...) but the "
            f"config asks for num_classes={config.num_classes}; prepare the dataset with the config's tag set or "
            "set num_classes to match")
    if config.input.crop_frames > prepared.chunk_frames:
        raise ValueError(f"input.crop_frames {config.input.crop_frames} exceeds the dataset's chunks of "
                         f"{prepared.chunk_frames} frames")


def checkpoint_meta(fields: dict[str, Any], prepared: PreparedDataset, config: ml_collections.ConfigDict,
                    kind: str, step: int, steps_per_epoch: int) -> dict[str, Any]:
    """What a checkpoint needs to be used without the training config."""
    return {
        "format": "emorf_jax.checkpoint/1",
        "kind": kind,
        "step": int(step),
        "epoch": step / steps_per_epoch,
        "model": dict(fields),
        "tags": list(prepared.tags),
        "features": dict(prepared.features),
        "normalisation": {"mean": np.asarray(prepared.mean).tolist(), "std": np.asarray(prepared.std).tolist()},
        "dataset": {"config_name": config.dataset.config_name, "split_index": config.dataset.split_index},
    }


class _Run:
    """The pieces of one training run that the loop and the evaluations share."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, prepared: PreparedDataset):
        self.config, self.workdir, self.prepared = config, workdir, prepared
        self.fields = model_fields(config)
        self.model = create_model(self.fields, half_precision=config.half_precision, axis_name="batch")
        self.steps_per_epoch = input_pipeline.steps_per_epoch(prepared, config.batch_size)
        self.total_steps = int(round(config.num_epochs * self.steps_per_epoch))
        self.schedule = learning_rate_schedule(config, self.steps_per_epoch)
        self.tx = optax.adam(self.schedule, b1=config.adam_b1, b2=config.adam_b2)
        self.averaging = averaging_schedule(config, self.steps_per_epoch)
        self.p_train_step = jax.pmap(
            functools.partial(train_step, model=self.model, tx=self.tx, mixup_alpha=config.mixup_alpha,
                              averaging=self.averaging, learning_rate=self.schedule),
            axis_name="batch", donate_argnums=(0,))
        stats_model = self.model.clone(bn_momentum=0.0)
        self.p_batch_stats = jax.pmap(functools.partial(batch_stats_step, model=stats_model), axis_name="batch")
        self.predictor = inference.Predictor(self.model.clone(bn_axis_name=None), prepared,
                                             window_frames=config.input.eval_window_frames,
                                             batch_size=config.eval_batch_size)

    def meta(self, kind: str, step: int) -> dict[str, Any]:
        return checkpoint_meta(self.fields, self.prepared, self.config, kind, step, self.steps_per_epoch)

    def train_batches(self, start_step: int, seed: int) -> Iterator[Any]:
        batches = input_pipeline.train_batches(
            self.prepared, global_batch_size=self.config.batch_size, crop_frames=self.config.input.crop_frames,
            max_time_shift=self.config.input.max_time_shift, shuffle_buffer=self.config.input.shuffle_buffer,
            seed=seed, start_step=start_step)
        return jax_utils.prefetch_to_device(batches, 2)

    def averaged_variables(self, state: TrainState) -> dict[str, Any]:
        """The averaged weights with BatchNorm statistics re-estimated on training batches (host-local)."""
        num_batches = self.config.bn_reestimate_batches or self.steps_per_epoch
        batches = self.train_batches(start_step=0, seed=self.config.seed + 1)
        batch_stats = weight_averaging.reestimate_batch_stats(
            lambda params, batch: self.p_batch_stats(params, state.batch_stats, batch),
            state.average_params, batches, num_batches)
        return {"params": jax_utils.unreplicate(state.average_params),
                "batch_stats": jax_utils.unreplicate(batch_stats)}


def current_variables(state: TrainState) -> dict[str, Any]:
    return {"params": jax_utils.unreplicate(state.params), "batch_stats": jax_utils.unreplicate(state.batch_stats)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, float]]:
    """Trains (or resumes) the run in `workdir` to its last step and returns the final test report."""
    check_config(config)
    checkpoints.check_workdir_config(workdir, config)
    prepared = load_or_make_dataset(config, workdir)
    check_dataset(config, prepared)
    run = _Run(config, workdir, prepared)

    n_mels = prepared.features["n_mels"]
    state = initial_state(run.model.clone(bn_axis_name=None), run.tx, jax.random.PRNGKey(config.seed),
                          (1, n_mels, config.input.crop_frames, 1))
    latest = checkpoints.open_manager(workdir, checkpoints.LATEST)
    if latest.latest_step() is not None:
        state, _ = checkpoints.restore(latest, target=state)
        logging.info("Resuming from step %d", int(state.step))
    start_step = int(state.step)
    state = jax_utils.replicate(state)

    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
        writer.write_hparams(traverse_util.flatten_dict(config.to_dict(), sep="."))
    report_progress = periodic_actions.ReportProgress(num_train_steps=run.total_steps, writer=writer)
    snapshots = checkpoints.open_manager(workdir, checkpoints.SNAPSHOTS)
    swa = checkpoints.open_manager(workdir, checkpoints.SWA)
    best = checkpoints.open_manager(workdir, checkpoints.BEST)
    snapshot_at = set(snapshot_steps(config, run.steps_per_epoch, run.total_steps))
    eval_every = max(int(round(config.eval_every_epochs * run.steps_per_epoch)), 1)
    rng = jax_utils.replicate(jax.random.PRNGKey(config.seed + 2))
    logging.info("%d steps per epoch, %d steps in all, snapshots at %s", run.steps_per_epoch, run.total_steps,
                 sorted(snapshot_at))

    batches = run.train_batches(start_step, config.seed)
    train_losses = []
    for step in range(start_step + 1, run.total_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, step_metrics = run.p_train_step(state, next(batches), rng)
        report_progress(step)
        train_losses.append(step_metrics["loss"])
        if step % config.log_every_steps == 0 or step == run.total_steps:
            values = jax.device_get(jax_utils.unreplicate(step_metrics))
            losses = jax.device_get(train_losses)
            writer.write_scalars(step, {"train_loss": float(np.mean([l[0] for l in losses])),
                                        "learning_rate": float(values["learning_rate"]),
                                        "epoch": step / run.steps_per_epoch})
            train_losses = []
        if step in snapshot_at:
            checkpoints.save(snapshots, step, current_variables(state), run.meta("snapshot", step))
        if step % eval_every == 0 or step == run.total_steps:
            _evaluate_and_select(run, state, step, writer, best, swa)
        if step % config.checkpoint_every_steps == 0 or step == run.total_steps:
            checkpoints.save(latest, step, jax_utils.unreplicate(state), run.meta("latest", step))
    writer.flush()
    report = final_report(run, state, snapshots, best, swa)
    writer.close()
    return report


def _evaluate_and_select(run: _Run, state: TrainState, step: int, writer, best, swa) -> None:
    """Validation metrics of the current (and averaged) weights; keeps the best and the latest averaged model."""
    scores = {}
    variables = current_variables(state)
    validation = run.predictor.evaluate(variables, "validation")
    scores.update({f"val_{k}": v for k, v in validation.items()})
    selection = validation[run.config.selection_metric]
    score = -selection if run.config.selection_metric == "loss" else selection
    checkpoints.save(best, step, variables, run.meta("best", step) | {"validation": validation}, score=score)
    if int(jax_utils.unreplicate(state.average_count)) > 0:
        averaged = run.averaged_variables(state)
        averaged_validation = run.predictor.evaluate(averaged, "validation")
        scores.update({f"val_average_{k}": v for k, v in averaged_validation.items()})
        checkpoints.save(swa, step, averaged, run.meta("swa", step) | {"validation": averaged_validation})
    writer.write_scalars(step, scores)
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in sorted(scores.items())))


def final_report(run: _Run, state: TrainState, snapshots, best, swa) -> dict[str, dict[str, float]]:
    """Test metrics of the final, selected, averaged and snapshot-ensemble models, thresholds from validation."""
    models = {"final": current_variables(state)}
    if best.best_step() is not None:
        models["selected"] = checkpoints.restore(best, best.best_step())[0]
    if swa.latest_step() is not None:
        models["swa"] = checkpoints.restore(swa)[0]
    predictions = {name: {split: run.predictor.predict(variables, split) for split in ("validation", "test")}
                   for name, variables in models.items()}
    members = snapshots.all_steps()[-run.config.snapshots.ensemble_size:]
    if members:
        member_predictions = [{split: run.predictor.predict(checkpoints.restore(snapshots, step)[0], split)
                               for split in ("validation", "test")} for step in members]
        predictions[f"snapshot_ensemble_{len(members)}"] = {
            split: inference.Predictions(
                ensemble.average_predictions([p[split].probabilities for p in member_predictions]),
                member_predictions[0][split].labels)
            for split in ("validation", "test")}

    report = {}
    report_dir = os.path.join(run.workdir, "report")
    os.makedirs(report_dir, exist_ok=True)
    for name, by_split in predictions.items():
        thresholds = metrics.best_f1_thresholds(by_split["validation"].labels, by_split["validation"].probabilities)
        test = by_split["test"]
        decisions = metrics.decide(test.probabilities, thresholds)
        report[name] = metrics.mediaeval_metrics(test.labels, test.probabilities, decisions)
        np.save(os.path.join(report_dir, f"{name}_predictions.npy"), test.probabilities)
        np.save(os.path.join(report_dir, f"{name}_decisions.npy"), decisions)
    positive_rate = float(predictions["final"]["test"].labels.mean())
    report["constant_predictor"] = {"PR-AUC-macro": positive_rate, "ROC-AUC-macro": 0.5}
    with open(os.path.join(report_dir, "test_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(format_report(report))
    return report


def format_report(report: dict[str, dict[str, float]]) -> str:
    width = max(len(name) for name in report)
    lines = [f"{'test set':<{width}}  PR-AUC-macro  ROC-AUC-macro"]
    for name, figures in report.items():
        lines.append(f"{name:<{width}}  {figures['PR-AUC-macro']:>12.4f}  {figures['ROC-AUC-macro']:>13.4f}")
    return "\n".join(lines)

