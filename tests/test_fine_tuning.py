"""Fine-tuning from a checkpoint (`config.init_from`): real orbax checkpoints and an exported PyTorch state_dict on
the shared synthetic dataset, the run's starting state, a frozen trunk trained for real, a mismatch refused."""

import logging
import subprocess
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from configs import faresnet
from data_prep.reader import load_prepared
from emorf_jax import checkpoints, export, fine_tuning, input_pipeline, train
from tests.test_faults_training import _assert_one_line_refusal
from tests.test_train import _command

REPO = Path(__file__).resolve().parents[1]


def _config(data_dir: Path, init_from: str = "", **fields):
    config = faresnet.get_config("test")
    config.dataset.data_dir = str(data_dir)
    config.init_from = init_from
    config.update(fields)
    return config


def _checkpoint(directory: Path, prepared, tags: list[str], seed: int, **model_fields) -> str:
    """An SWA checkpoint of the test config's FA-ResNet for `tags` (its meta's tag list and head width), written as a
    run writes it, with random parameters and BatchNorm statistics."""
    config = faresnet.get_config("test")
    config.model.update(model_fields)
    fields = train.model_fields(config, len(tags))
    variables = train.create_model(fields).init(
        jax.random.PRNGKey(seed), np.zeros(input_pipeline.model_input_shape(prepared, 64), np.float32)
    )
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    variables = jax.tree.unflatten(
        treedef, [np.abs(leaf + 0.3 * jax.random.normal(key, leaf.shape)) for leaf, key in zip(leaves, keys)]
    )
    meta = train.checkpoint_meta(fields, prepared, config, "swa", 10, 2.5) | {"tags": list(tags)}
    with checkpoints.open_manager(str(directory), checkpoints.SWA) as manager:
        checkpoints.save(manager, 10, variables, meta)
    return str(directory / checkpoints.SWA)


@pytest.fixture(scope="module")
def prepared(prepared_data_dir):
    return load_prepared(*prepared_data_dir)


@pytest.fixture(scope="module")
def other_tags(prepared) -> list[str]:
    """A checkpoint's tag list that shares three of the data's tags, in another order, and has two of its own."""
    tags = list(prepared.tags)
    return [tags[4], "mood/theme---elsewhere", tags[0], tags[2], "genre---unheard"]


def _start(config, prepared, workdir: Path) -> train.TrainState:
    model = train.create_model(train.model_fields(config, len(prepared.tags)))
    return train.starting_state(config, str(workdir), prepared, model, optax.adam(1e-3))


def _logits(variables, prepared, fields) -> np.ndarray:
    inputs = jax.random.normal(jax.random.PRNGKey(7), (3, prepared.frame_shape[-1], 96, 1))
    return np.asarray(train.create_model(fields).apply(variables, inputs, train=False))


def _variables(state: train.TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def test_the_same_tags_start_with_the_checkpoints_logits_from_a_folder_or_its_pytorch_export(
    prepared, prepared_data_dir, tmp_path, caplog
):
    source = _checkpoint(tmp_path / "pretrained", prepared, list(prepared.tags), seed=3)
    expected_variables, _ = checkpoints.load_checkpoint(source)
    fields = train.model_fields(_config(prepared_data_dir[0]), len(prepared.tags))
    expected = _logits(expected_variables, prepared, fields)
    fresh = _logits(_variables(_start(_config(prepared_data_dir[0]), prepared, tmp_path / "fresh")), prepared, fields)
    assert not np.allclose(fresh, expected, atol=1e-2), "the check below would not tell loading from initialising"

    exported, settings = export.export_torch(source, tmp_path / "exported" / "model.pt")
    for init_from in (source, str(exported)):
        with caplog.at_level(logging.INFO):
            state = _start(_config(prepared_data_dir[0], init_from), prepared, tmp_path / "run")
        np.testing.assert_allclose(_logits(_variables(state), prepared, fields), expected, rtol=1e-5, atol=1e-5)
        assert int(state.step) == 0
        jax.tree.map(np.testing.assert_array_equal, state.average_params, state.params)
        total = len(fine_tuning.flatten(expected_variables))
        assert (
            f"loaded {total} of the model's {total} variables; the head's included (the same {len(prepared.tags)} tags)"
            in caplog.text
        )

    settings.unlink()  # the state_dict alone names no tags: the whole head starts afresh, the trunk is loaded
    caplog.clear()
    with caplog.at_level(logging.INFO):
        state = _start(_config(prepared_data_dir[0], str(exported)), prepared, tmp_path / "run")
    assert "the checkpoint names no tags" in caplog.text and "keeping the rows of 0 tags" in caplog.text
    np.testing.assert_array_equal(
        state.params["in_c_conv"]["kernel"], expected_variables["params"]["in_c_conv"]["kernel"]
    )


def test_other_tags_keep_the_trunk_and_the_shared_tags_rows_and_start_the_others_afresh(
    prepared, prepared_data_dir, other_tags, tmp_path, caplog
):
    source = _checkpoint(tmp_path / "pretrained", prepared, other_tags, seed=4)
    loaded, _ = checkpoints.load_checkpoint(source)
    with caplog.at_level(logging.INFO):
        state = _start(_config(prepared_data_dir[0], source), prepared, tmp_path / "run")
    fresh = _start(_config(prepared_data_dir[0]), prepared, tmp_path / "fresh")

    fields = train.model_fields(_config(prepared_data_dir[0]), len(prepared.tags))
    head = fine_tuning.head_axes(fields, input_pipeline.model_input_shape(prepared, 64))
    assert set(head) == {
        ("params", "feed_forward_conv", "kernel"),
        ("params", "feed_forward_bn", "scale"),
        ("params", "feed_forward_bn", "bias"),
        ("batch_stats", "feed_forward_bn", "mean"),
        ("batch_stats", "feed_forward_bn", "var"),
    }
    started, checkpoint, initialised = (
        fine_tuning.flatten(variables) for variables in (_variables(state), loaded, _variables(fresh))
    )
    for path, value in started.items():
        if path not in head:
            np.testing.assert_array_equal(value, checkpoint[path], err_msg=str(path))
            continue
        for run_row, tag in enumerate(prepared.tags):
            expected = (
                checkpoint[path][..., other_tags.index(tag)] if tag in other_tags else initialised[path][..., run_row]
            )
            np.testing.assert_array_equal(value[..., run_row], expected, err_msg=f"{path} {tag}")
    shared = ", ".join(tag for tag in prepared.tags if tag in other_tags)
    assert (
        f"re-initialised the head (5 variables) for the run's 9 tags, keeping the rows of 3 tags both share ({shared})"
        in caplog.text
    )
    assert "ignored: the rows of 2 checkpoint tags the run lacks" in caplog.text


def test_a_frozen_trunk_trains_the_head_alone_with_the_recipes_swa_and_snapshots(
    prepared, prepared_data_dir, other_tags, tmp_path
):
    source = _checkpoint(tmp_path / "pretrained", prepared, other_tags, seed=5)
    loaded, _ = checkpoints.load_checkpoint(source)
    config = _config(prepared_data_dir[0], source, freeze_trunk=True, num_epochs=1, eval_every_epochs=1.0)
    config.weight_average.start_epoch = config.snapshots.start_epoch = 0.5  # an SWA model and a snapshot in 1 epoch
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))

    with checkpoints.open_manager(str(workdir), checkpoints.LATEST, read_only=True) as manager:
        final, _ = checkpoints.restore(manager)
    swa, _ = checkpoints.load_checkpoint(str(workdir / checkpoints.SWA))
    snapshot, _ = checkpoints.load_checkpoint(str(workdir / checkpoints.SNAPSHOTS))
    head = fine_tuning.head_axes(
        train.model_fields(config, len(prepared.tags)), input_pipeline.model_input_shape(prepared, 64)
    )
    checkpoint = fine_tuning.flatten(loaded)
    started = fine_tuning.flatten(_variables(_start(config, prepared, tmp_path / "again")))
    trained = fine_tuning.flatten({"params": final["params"], "batch_stats": final["batch_stats"]})
    for path, value in trained.items():
        if path not in head:
            np.testing.assert_array_equal(value, checkpoint[path], err_msg=f"the frozen trunk's {path} changed")
            np.testing.assert_allclose(fine_tuning.flatten(swa)[path], checkpoint[path], rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(fine_tuning.flatten(snapshot)[path], checkpoint[path])
    changed = [path for path in head if path[0] == "params" and not np.array_equal(trained[path], started[path])]
    assert changed == [path for path in head if path[0] == "params"], "every head parameter trains"
    np.testing.assert_array_equal(
        final["batch_stats"]["feed_forward_bn"]["mean"], started[("batch_stats", "feed_forward_bn", "mean")]
    )


def test_a_slower_trunk_takes_the_factor_of_the_heads_step_and_a_frozen_one_none(prepared, prepared_data_dir):
    fields = train.model_fields(_config(prepared_data_dir[0]), len(prepared.tags))
    input_shape = input_pipeline.model_input_shape(prepared, 64)
    params = train.create_model(fields).init(jax.random.PRNGKey(0), np.zeros(input_shape, np.float32))["params"]
    grads = jax.tree.map(lambda leaf: jax.random.normal(jax.random.PRNGKey(1), leaf.shape), params)
    head = fine_tuning.head_axes(fields, input_shape)
    schedule = optax.constant_schedule(1e-3)

    def first_update(**fields):
        tx = train.optimizer(_config(prepared_data_dir[0], "checkpoint", **fields), schedule, head)
        return fine_tuning.flatten({"params": tx.update(grads, tx.init(params), params)[0]})

    plain, slower, frozen = (
        first_update(),
        first_update(trunk_learning_rate_factor=0.1),
        first_update(freeze_trunk=True),
    )
    for path, update in plain.items():
        in_head = path in head
        np.testing.assert_allclose(slower[path], update if in_head else 0.1 * update, rtol=1e-6, err_msg=str(path))
        np.testing.assert_array_equal(frozen[path], update if in_head else np.zeros_like(update))
    assert np.abs(plain[("params", "in_c_conv", "kernel")]).max() > 0


def test_another_width_or_family_is_refused_in_one_line_before_anything_is_written(
    prepared, prepared_data_dir, tmp_path
):
    data_dir = prepared_data_dir[0]
    wider = _checkpoint(tmp_path / "wider", prepared, list(prepared.tags), seed=6, base_channels=8)
    workdir = tmp_path / "run"
    result = subprocess.run(
        _command(data_dir, workdir, f"--config.init_from={wider}"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    _assert_one_line_refusal(
        result,
        f"init_from {wider} does not fit",
        "params/in_c_conv/kernel is (5, 5, 1, 8) in the checkpoint and (5, 5, 1, 4) in the model",
    )
    assert not workdir.exists()

    plain = _checkpoint(tmp_path / "plain", prepared, list(prepared.tags), seed=6, frequency_aware=False)
    with pytest.raises(
        fine_tuning.ModelMismatch,
        match=r"stage1_block1/conv1/kernel is \(3, 3, 4, 4\) in the checkpoint and \(3, 3, 5, 4\)",
    ):
        train.check_run(_config(data_dir, plain), str(workdir))
    with pytest.raises(ValueError, match="--config.init_from=CHECKPOINT"):
        train.check_run(_config(data_dir, freeze_trunk=True), str(workdir))
    assert not workdir.exists()
