"""The other systems of the paper's table: VGG-ish, ResNet-18/34/50 and CRNN through the ordinary training step,
checkpoints, tagging and evaluation; the popularity baseline against the official row; the ensemble recipe."""

import functools
import importlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils

from benchmarks import reference_data
from configs import avg_ensemble
from data_prep import metadata
from data_prep.reader import load_prepared
from emorf_jax import (
    baselines,
    checkpoints,
    ensemble_recipe,
    evaluate,
    metrics,
    report,
    split_predictions,
    train,
    weight_averaging,
)
from emorf_jax.models import registry
from emorf_jax.tagger import Member, Tagger, load_tagger, model_card

OFFICIAL = reference_data.MEDIAEVAL2019
REAL_METADATA = reference_data.MTG_JAMENDO_METADATA


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _fields(config_name: str, variant: str | None) -> dict:
    return train.model_fields(importlib.import_module(f"configs.{config_name}").get_config(variant), 56)


# (config, input at paper size, parameters at 56 tags): torchvision's ResNet counts less the 2 extra input channels
# and the 1,000-class head; VGG-ish the organisers' network; CRNN with a GRU input of 2 rows x 128 channels.
@pytest.mark.parametrize(
    "config_name, input_shape, expected",
    [
        ("vggish", (1, 256, 861, 1), 448_122),
        ("vggish_essentia96", (1, 96, 1366, 1), 448_122),
        ("resnet18", (1, 256, 861, 1), 11_198_968),
        ("resnet34", (1, 256, 287, 1), 21_307_128),
        ("resnet50", (1, 256, 861, 1), 23_616_504),
        ("crnn", (1, 256, 861, 1), 406_458),
    ],
)
def test_parameter_counts_at_paper_size_with_56_tags(config_name, input_shape, expected):
    model = train.create_model(_fields(config_name, None))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(input_shape), train=False))
    assert _count(shapes["params"]) == expected


def test_vggish_pools_the_organisers_input_to_one_by_one():
    model = train.create_model(_fields("vggish_essentia96", None))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 96, 1366, 1)), train=False))
    assert shapes["params"]["dense"]["kernel"].shape == (64, 56)  # 64 channels x 1 x 1, as their flatten
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        registry.build({"name": "vgg", "num_classes": 3})


def test_checkpoints_without_a_model_name_are_cp_resnets():
    model = registry.build(
        {"num_classes": 3, "rho": 2, "base_channels": 4, "frequency_aware": True, "shake_shake": False}
    )
    assert type(model).__name__ == "CPResNet" and model.frequency_aware


N_MELS, FRAMES, GLOBAL_BATCH = 256, 64, 4
# Parameters of each `:test` model (9 tags, 256 bands; the CRNN's GRU input depends on the bands). ResNet-34 is
# ResNet-18's code with [3, 4, 6, 3] blocks (its count is checked above): left out here, its compilation is costly.
TEST_SIZES = {"vggish": 1_907, "resnet18": 11_447, "resnet50": 25_239, "crnn": 1_975}


@pytest.fixture(scope="module")
def prepared(prepared_data_dir):
    return load_prepared(*prepared_data_dir)


@pytest.mark.parametrize("config_name", sorted(TEST_SIZES))
def test_each_model_trains_saves_loads_and_tags_through_the_same_tools(config_name, prepared, tmp_path):
    config = importlib.import_module(f"configs.{config_name}").get_config("test")
    fields = train.model_fields(config, len(prepared.tags))
    model = train.create_model(fields, axis_name="batch")
    tx = optax.adam(1e-2)
    state = train.initial_state(model.clone(bn_axis_name=None), tx, jax.random.PRNGKey(0), (1, N_MELS, FRAMES, 1))
    assert _count(state.params) == TEST_SIZES[config_name]

    step = jax.pmap(
        functools.partial(
            train.train_step,
            model=model,
            tx=tx,
            mixup_alpha=0.3,
            pos_weight=1.0,
            mixup_reduction="batch_mean",
            averaging=weight_averaging.AveragingSchedule("swa", swa_steps=(1,)),
            learning_rate=optax.constant_schedule(1e-2),
            normalisation=(prepared.mean, prepared.std),
        ),
        axis_name="batch",
    )
    rng = np.random.default_rng(0)
    share = (jax.local_device_count(), GLOBAL_BATCH // jax.local_device_count())
    stored = rng.normal(size=(*share, FRAMES, N_MELS)) * prepared.std + prepared.mean
    batch = {"spectrogram": stored.astype(np.float16), "labels": (rng.random((*share, 9)) < 0.4).astype(np.float32)}
    new_state, step_metrics = step(jax_utils.replicate(state), batch, jax_utils.replicate(jax.random.PRNGKey(1)))
    assert np.all(np.isfinite(np.asarray(step_metrics["loss"])))
    variables = train.current_variables(new_state)
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), variables["params"], state.params)
    )
    assert max(moved) > 0

    with checkpoints.open_manager(str(tmp_path), checkpoints.SWA) as manager:
        checkpoints.save(manager, 1, variables, train.checkpoint_meta(fields, prepared, config, "swa", 1, 1.0))
    tagger = load_tagger(str(tmp_path / checkpoints.SWA))
    assert tagger.meta["model"]["name"] == config_name and tagger.members[0].model == model.clone(bn_axis_name=None)
    # The loaded weights tag as the trained ones do (one compiled program serves both: the models are equal).
    spectrogram = rng.normal(size=(N_MELS, 2 * FRAMES)).astype(np.float32)
    trained = Tagger((Member(model.clone(bn_axis_name=None), variables, tagger.meta),))
    probabilities = tagger.tag_spectrogram(spectrogram, window_frames=FRAMES).probabilities
    np.testing.assert_allclose(
        probabilities, trained.tag_spectrogram(spectrogram, window_frames=FRAMES).probabilities, rtol=1e-6, atol=1e-7
    )
    assert probabilities.shape == (9,) and np.all((probabilities > 0) & (probabilities < 1))

    card = model_card(str(tmp_path / checkpoints.SWA))
    assert registry.DISPLAY_NAMES[config_name] in card and "receptive field" not in card


@pytest.mark.skipif(
    not (OFFICIAL / "groundtruth.npy").is_file() or not REAL_METADATA.is_dir(),
    reason=f"official ground truth or real metadata not found under {reference_data.ROOT}",
)
def test_popularity_baseline_reproduces_the_official_row(capsys):
    header, *rows = (OFFICIAL / "baseline" / "results.tsv").read_text().splitlines()
    official = dict(
        zip(header.split("\t")[1:], map(float, next(r for r in rows if r.startswith("popular\t")).split("\t")[1:]))
    )
    groundtruth = np.load(OFFICIAL / "groundtruth.npy")
    np.testing.assert_array_equal(groundtruth, metadata.split_labels(REAL_METADATA, 0, "test"))
    train_labels = metadata.split_labels(REAL_METADATA, 0, "train")
    tags = metadata.read_tag_list(REAL_METADATA)
    assert tags[baselines.popular_tag(train_labels)] == "mood/theme---happy"  # 927 of the 9,949 training tracks
    predictions, decisions = baselines.popularity_baseline(train_labels, len(groundtruth))
    figures = metrics.mediaeval_metrics(groundtruth, predictions, decisions)
    assert set(figures) == set(official)
    for name, value in official.items():
        assert round(figures[name], 6) == value, name
    assert (
        evaluate.main(
            [
                "--groundtruth",
                str(OFFICIAL / "groundtruth.npy"),
                "--popularity",
                "--metadata_dir",
                str(REAL_METADATA),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == figures


@pytest.mark.skipif(not REAL_METADATA.is_dir(), reason=f"real metadata not found under {reference_data.ROOT}")
def test_evaluate_reads_another_subsets_tags_and_training_labels(tmp_path, capsys):
    """`evaluate --subset genre`: the popular baseline counts the genre split's training tracks and is scored against
    ground truth with the genre subset's 87 columns (the mood/theme list would refuse its shape)."""
    groundtruth = metadata.split_labels(REAL_METADATA, 0, "test", "genre")
    assert groundtruth.shape[1] == 87
    np.save(tmp_path / "genre.npy", groundtruth)
    arguments = ["--groundtruth", str(tmp_path / "genre.npy"), "--popularity", "--metadata_dir", str(REAL_METADATA)]
    assert evaluate.main([*arguments, "--subset", "genre", "--json"]) == 0
    train_labels = metadata.split_labels(REAL_METADATA, 0, "train", "genre")
    expected = metrics.mediaeval_metrics(groundtruth, *baselines.popularity_baseline(train_labels, len(groundtruth)))
    assert json.loads(capsys.readouterr().out) == expected
    with pytest.raises(SystemExit):
        evaluate.main([*arguments, "--json"])  # the default subset's 56 tags do not fit 87 columns
    assert "56" in capsys.readouterr().err


def test_ensemble_recipe_averages_its_members_swa_and_snapshots(prepared_data_dir, tmp_path):
    data_dir, _ = prepared_data_dir
    recipe = avg_ensemble.get_config("test")
    recipe.dataset.data_dir = str(data_dir)
    figures = ensemble_recipe.run(recipe, str(tmp_path), {"input.max_time_shift": 7})  # a --config.field override
    assert set(figures) == set(metrics.OFFICIAL_METRIC_NAMES)
    members = [ensemble_recipe.member_workdir(str(tmp_path), *member) for member in recipe.ensemble.members]
    metas = [json.loads(Path(member, "config.json").read_text()) for member in members]
    assert {
        (meta["model"]["frequency_aware"], meta["model"]["shake_shake"], meta["model"]["rho"], meta["seed"])
        for meta in metas
    } == {(True, False, 2, 0), (True, True, 3, 1)}
    assert [meta["input"]["max_time_shift"] for meta in metas] == [7, 7], "the override holds for every member"
    paths = [
        p for member in members for p in ensemble_recipe.member_checkpoints(member, recipe.ensemble.checkpoints, 2)
    ]
    kinds = [Path(p).parent.name for p in paths]
    assert kinds.count("swa") == 2 and kinds.count("snapshots") == 4  # per member: SWA and its last 2 snapshots
    # The figures are those of the submission written with the ensemble's report.
    test = load_prepared(*prepared_data_dir).parts["test"]
    submitted = tmp_path / "ensemble" / "submission"
    assert (
        metrics.mediaeval_metrics(
            test.labels, np.load(submitted / "predictions.npy"), np.load(submitted / "decisions.npy")
        )
        == figures
    )
    assert json.loads((tmp_path / "ensemble" / "metrics.json").read_text()) == figures


def test_the_constant_predictor_is_scored_on_the_tags_of_the_models_macro_figures(capsys):
    """4 of 9 tags have both classes: the constant predictor's macro PR-AUC is their mean positive rate, not the
    label mean over all 9 tags, and a model's macro figures average the same 4 tags."""
    rng = np.random.default_rng(0)
    labels = np.zeros((20, 9), bool)
    labels[:2, 0], labels[:5, 1], labels[:10, 2], labels[:15, 3] = True, True, True, True
    labels[:, 8] = True  # tags 4-7 have no positive track, tag 8 no negative one
    both = [0, 1, 2, 3]
    with pytest.warns(UserWarning, match=r"tags \[4, 5, 6, 7, 8\] have only positive or only negative tracks"):
        constant = baselines.constant_predictor_figures(labels)
    assert constant["PR-AUC-macro"] == pytest.approx(labels[:, both].mean(axis=0).mean(), abs=1e-12)  # 0.4
    assert constant["PR-AUC-macro"] == pytest.approx(0.4) and labels.mean() == pytest.approx((1.6 + 1) / 9)
    assert constant["ROC-AUC-macro"] == 0.5
    # Like for like: what the same function gives a model whose scores are each tag's rate (constant per tag, so
    # ranking nothing), and a trained-looking model's macro figure is the mean of the same 4 tags' PR-AUC.
    rates = np.broadcast_to(labels.mean(axis=0), labels.shape)
    with pytest.warns(UserWarning):
        assert metrics.mediaeval_metrics(labels, rates)["PR-AUC-macro"] == pytest.approx(constant["PR-AUC-macro"])
    scores = np.clip(labels + rng.normal(0, 0.6, labels.shape), 0, 1)
    with pytest.warns(UserWarning):
        model = metrics.mediaeval_metrics(labels, scores)
    assert model["PR-AUC-macro"] == pytest.approx(metrics.per_tag_pr_auc(labels, scores)[both].mean(), abs=1e-12)
    # The training report sets them side by side: the same figures, on the same tags.
    test = split_predictions.Predictions(scores.astype(np.float32), labels, tuple(f"track_{i}" for i in range(20)))
    with pytest.warns(UserWarning):
        summary = report.run_summary({"final": report.model_report("final", [f"t{i}" for i in range(9)], test, test)})
    assert summary["constant_predictor"] == constant
    assert summary["final"]["PR-AUC-macro"] == pytest.approx(model["PR-AUC-macro"], abs=1e-6)
    assert summary["final"]["calibration"]["positive-rate"] == pytest.approx(labels.mean())
    table = report.format_summary(summary).splitlines()
    assert table[-1].split() == ["constant_predictor", "0.4000", "0.5000"]
    assert table[0].endswith(f"(positive rate {labels.mean():.4f})") and len(table[1].split()) == 5
