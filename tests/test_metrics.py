"""The official MediaEval 2019 figures, thresholds, ensembling and the evaluate CLI, on the published files."""

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from benchmarks import reference_data
from data_prep import metadata
from emorf_jax import ensemble, metrics
from emorf_jax import thresholds as thresholds_io

REPO_ROOT = Path(__file__).resolve().parents[1]
MEDIAEVAL = reference_data.MEDIAEVAL2019
JAMENDO = reference_data.MTG_JAMENDO_METADATA
needs_shared = pytest.mark.skipif(
    not (MEDIAEVAL / "groundtruth.npy").exists(),
    reason=f"{MEDIAEVAL} (the official ground truth and submitted runs) is absent",
)


def _published_rows(table: str) -> list[tuple[str, str, dict[str, str]]]:
    """(table, run, {metric: value as printed}) for every row of a published results.tsv."""
    path = MEDIAEVAL / table / "results.tsv"
    if not path.exists():
        return []
    with path.open(newline="") as file:
        rows = list(csv.reader(file, delimiter="\t"))
    header = rows[0][1:]
    return [(table, row[0], dict(zip(header, row[1:]))) for row in rows[1:]]


PUBLISHED = _published_rows("CP-JKU") + _published_rows("baseline")


def _groundtruth() -> np.ndarray:
    return np.load(MEDIAEVAL / "groundtruth.npy")


def _train_tag_counts() -> np.ndarray:
    """Tracks per tag in split-0's training part."""
    tag_list = metadata.read_tag_list(JAMENDO)
    tracks = metadata.read_split(JAMENDO, 0, "train")
    return np.sum([metadata.track_labels(track, tag_list) for track in tracks], axis=0)


def _popularity_baseline(n_tracks: int) -> np.ndarray:
    """The organisers' "popular" run: every track tagged with the training split's most frequent tag.

    Its one bool matrix served as both predictions and decisions: that reproduces the published micro
    figures, whereas per-tag training frequencies as scores give the same macro row but micro PR-AUC 0.0609.
    """
    counts = _train_tag_counts()
    decisions = np.zeros((n_tracks, len(counts)), dtype=bool)
    decisions[:, np.argmax(counts)] = True
    return decisions


def _run_files(table: str, run: str) -> tuple[np.ndarray, np.ndarray]:
    if run == "popular":
        popular = _popularity_baseline(_groundtruth().shape[0])
        return popular, popular
    folder = MEDIAEVAL / table / run
    return np.load(folder / "predictions.npy"), np.load(folder / "decisions.npy")


@needs_shared
@pytest.mark.parametrize(("table", "run", "published"), PUBLISHED, ids=[f"{t}/{r}" for t, r, _ in PUBLISHED])
def test_metrics_reproduce_every_published_row(table, run, published):
    predictions, decisions = _run_files(table, run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the official files must not make scikit-learn warn
        figures = metrics.mediaeval_metrics(_groundtruth(), predictions, decisions)
    assert list(figures) == list(published)
    assert {name: f"{value:.6f}" for name, value in figures.items()} == published


@needs_shared
def test_published_tables_have_all_runs():
    assert [(table, run) for table, run, _ in PUBLISHED] == [
        ("CP-JKU", "1_shakefaresnet"),
        ("CP-JKU", "2_faresnet"),
        ("CP-JKU", "3_avg_ensemble"),
        ("CP-JKU", "4_crnn"),
        ("CP-JKU", "5_resnet34"),
        ("baseline", "popular"),
        ("baseline", "vggish"),
    ]
    assert _train_tag_counts().argmax() == metadata.read_tag_list(JAMENDO).index("mood/theme---happy")


@needs_shared
def test_vggish_thresholds_give_its_decisions_with_strict_greater():
    tags, thresholds = thresholds_io.read(MEDIAEVAL / "baseline" / "vggish" / "thresholds.txt")
    predictions = np.load(MEDIAEVAL / "baseline" / "vggish" / "predictions.npy")
    assert tuple(tags) == metadata.read_tag_list(JAMENDO)
    np.testing.assert_array_equal(
        metrics.decide(predictions, thresholds), np.load(MEDIAEVAL / "baseline" / "vggish" / "decisions.npy")
    )
    assert not np.array_equal(predictions >= thresholds, predictions > thresholds)


@needs_shared
def test_best_f1_thresholds_beat_the_organisers_on_their_own_set():
    """Chosen on the test set as the organisers did, our thresholds give each tag at least their F1."""
    groundtruth = _groundtruth()
    predictions = np.load(MEDIAEVAL / "baseline" / "vggish" / "predictions.npy")
    _, organisers = thresholds_io.read(MEDIAEVAL / "baseline" / "vggish" / "thresholds.txt")
    ours = metrics.best_f1_thresholds(groundtruth, predictions)
    f1_ours = f1_score(groundtruth, metrics.decide(predictions, ours), average=None, zero_division=0)
    f1_organisers = f1_score(groundtruth, metrics.decide(predictions, organisers), average=None, zero_division=0)
    assert np.all(f1_ours >= f1_organisers)
    assert f1_ours.mean() > f1_organisers.mean()


def test_best_f1_threshold_on_a_hand_made_case():
    groundtruth = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 1, 0], [1, 1, 0]], dtype=bool)
    predictions = np.array([[0.9, 0.2, 0.1], [0.8, 0.3, 0.2], [0.7, 0.4, 0.3], [0.1, 0.5, 0.4], [0.7, 0.6, 0.5]])
    thresholds = metrics.best_f1_thresholds(groundtruth, predictions)
    # Tag 0: positives score 0.9, 0.8, 0.7 and a negative ties at 0.7; every score >= 0.7 (F1 6/7) beats
    # >= 0.8 (F1 4/5), so the cut lies halfway to the next lower score, 0.1.
    # Tag 1: the three top scores are exactly the positives: halfway between 0.3 and 0.4.
    # Tag 2: one positive at 0.3 below two negatives; every score >= 0.3 gives the best F1, 2/4.
    np.testing.assert_allclose(thresholds, [0.4, 0.35, 0.25])
    decisions = metrics.decide(predictions, thresholds)
    np.testing.assert_array_equal(decisions[:, 0], [1, 1, 1, 0, 1])
    np.testing.assert_array_equal(decisions[:, 1], groundtruth[:, 1])
    np.testing.assert_array_equal(decisions[:, 2], [0, 0, 1, 1, 1])


def test_best_f1_threshold_takes_all_tracks_or_none():
    groundtruth = np.array([[1, 0], [1, 0], [1, 0]], dtype=bool)
    predictions = np.array([[0.1, 0.5], [0.2, 0.6], [0.3, 0.7]])
    with pytest.warns(UserWarning, match=r"tags \[1\] have no positive track"):
        thresholds = metrics.best_f1_thresholds(groundtruth, predictions)
    assert thresholds[0] == -np.inf  # every track is positive: deciding all of them is best
    assert thresholds[1] == np.inf  # no positive to find: never decide positive
    np.testing.assert_array_equal(metrics.decide(predictions, thresholds), groundtruth)


def test_best_f1_threshold_separates_adjacent_floats():
    """Halfway between two adjacent float64 values rounds to the upper one; the cut must stay below it."""
    low = np.nextafter(0.5, 1.0)
    predictions = np.array([[low], [np.nextafter(low, 1.0)]])
    thresholds = metrics.best_f1_thresholds(np.array([[0], [1]]), predictions)
    np.testing.assert_array_equal(metrics.decide(predictions, thresholds), [[False], [True]])


def test_metrics_without_decisions_are_the_four_aucs():
    groundtruth = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    figures = metrics.mediaeval_metrics(groundtruth, np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6], [0.1, 0.3]]))
    assert list(figures) == list(metrics.AUC_METRIC_NAMES)
    assert figures["PR-AUC-macro"] == pytest.approx(1.0)
    assert figures["ROC-AUC-macro"] == pytest.approx(1.0)


def test_constant_tags_are_left_out_of_macro_figures_with_one_warning():
    groundtruth = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=bool)
    predictions = np.array([[0.9, 0.5, 0.1], [0.2, 0.5, 0.2], [0.7, 0.5, 0.3], [0.1, 0.5, 0.4]])
    decisions = predictions > 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        figures = metrics.mediaeval_metrics(groundtruth, predictions, decisions)
    assert [str(w.message) for w in caught] == [
        "tags [1, 2] have only positive or only negative tracks in groundtruth; they are left out of the macro averages"
    ]
    assert figures["ROC-AUC-macro"] == pytest.approx(1.0)
    assert figures["F-score-macro"] == pytest.approx(1.0)
    assert figures["recall-micro"] == pytest.approx(2 / 6)


@pytest.mark.parametrize(
    ("groundtruth", "predictions", "decisions", "message"),
    [
        (np.zeros((4, 3)), np.zeros((4, 2)), None, r"predictions shape \(4, 2\) .* groundtruth shape \(4, 3\)"),
        (np.eye(3), np.eye(3), np.ones((2, 3)), r"decisions shape \(2, 3\) .* groundtruth shape \(3, 3\)"),
        (np.eye(3), np.where(np.eye(3), np.nan, 0.5), None, r"predictions contain 3 NaN .* \(first at row 0, tag 0\)"),
        (np.eye(3) * 2, np.eye(3), None, r"groundtruth must hold bool or 0/1 values, found 2\.0 at row 0, tag 0"),
        (np.eye(3), np.zeros(3), None, r"predictions must be a 2-D \(tracks, tags\) matrix, got shape \(3,\)"),
        (np.zeros((3, 2)), np.zeros((3, 2)), None, r"no tag with both positive and negative tracks"),
    ],
)
def test_metrics_refuse_bad_input_naming_it(groundtruth, predictions, decisions, message):
    with pytest.raises(ValueError, match=message):
        metrics.mediaeval_metrics(groundtruth, predictions, decisions)


def test_decide_refuses_thresholds_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"thresholds shape \(2,\) .* 3 tags of predictions shape \(4, 3\)"):
        metrics.decide(np.zeros((4, 3)), [0.5, 0.5])


def test_thresholds_file_round_trip_keeps_decisions(tmp_path):
    predictions = np.array([[0.1, 0.2], [0.3, 0.4]], dtype=np.float32)
    thresholds = np.array([np.nextafter(np.float32(0.1), np.float32(1)), -np.inf])
    thresholds_io.write(tmp_path / "thresholds.txt", ["mood/theme---calm", "mood/theme---dark"], thresholds)
    tags, read_back = thresholds_io.read(tmp_path / "thresholds.txt")
    assert tags == ["mood/theme---calm", "mood/theme---dark"]
    np.testing.assert_array_equal(read_back, thresholds)
    np.testing.assert_array_equal(metrics.decide(predictions, read_back), metrics.decide(predictions, thresholds))
    (tmp_path / "broken.txt").write_text("mood/theme---calm\t0.5\nmood/theme---dark 0.5\n")
    with pytest.raises(ValueError, match=r"broken.txt, line 2: expected 2 tab-separated fields, got 1"):
        thresholds_io.read(tmp_path / "broken.txt")


def test_average_predictions_weights_and_errors():
    first, second = np.array([[0.2, 0.4]]), np.array([[0.6, 1.0]])
    np.testing.assert_allclose(ensemble.average_predictions([first, second]), [[0.4, 0.7]])
    np.testing.assert_allclose(ensemble.average_predictions([first, second], weights=[3, 1]), [[0.3, 0.55]])
    with pytest.raises(ValueError, match=r"predictions\[1\] shape \(1, 3\) .* predictions\[0\] shape \(1, 2\)"):
        ensemble.average_predictions([first, np.zeros((1, 3))])
    with pytest.raises(ValueError, match=r"predictions\[1\] has values in \[-2, 3\].*logits"):
        ensemble.average_predictions([first, np.array([[-2.0, 3.0]])])
    with pytest.raises(ValueError, match=r"weights shape \(3,\) does not match the 2 prediction matrices"):
        ensemble.average_predictions([first, second], weights=[1, 1, 1])
    with pytest.raises(ValueError, match="at least one"):
        ensemble.average_predictions([])


@needs_shared
def test_averaging_the_two_single_model_runs_beats_each():
    runs = [np.load(MEDIAEVAL / "CP-JKU" / run / "predictions.npy") for run in ("1_shakefaresnet", "2_faresnet")]
    averaged = ensemble.average_predictions(runs)
    scores = [metrics.mediaeval_metrics(_groundtruth(), p)["PR-AUC-macro"] for p in [*runs, averaged]]
    assert scores[2] > max(scores[:2])


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emorf_jax.evaluate", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )


@needs_shared
def test_cli_prints_the_official_row_as_json_and_plots(tmp_path):
    run = MEDIAEVAL / "CP-JKU" / "3_avg_ensemble"
    plot = tmp_path / "per_tag.png"
    result = _run_cli(
        "--groundtruth",
        MEDIAEVAL / "groundtruth.npy",
        "--predictions",
        run / "predictions.npy",
        "--decisions",
        run / "decisions.npy",
        "--json",
        "--plot",
        plot,
        "--metadata_dir",
        JAMENDO,
    )
    assert result.returncode == 0, result.stderr
    published = dict((r, p) for t, r, p in PUBLISHED if t == "CP-JKU")["3_avg_ensemble"]
    assert {name: f"{value:.6f}" for name, value in json.loads(result.stdout).items()} == published
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000


@needs_shared
def test_cli_table_with_thresholds_file():
    vggish = MEDIAEVAL / "baseline" / "vggish"
    result = _run_cli(
        "--groundtruth",
        MEDIAEVAL / "groundtruth.npy",
        "--predictions",
        vggish / "predictions.npy",
        "--thresholds",
        vggish / "thresholds.txt",
    )
    assert result.returncode == 0, result.stderr
    published = dict((r, p) for t, r, p in PUBLISHED if t == "baseline")["vggish"]
    assert result.stdout.splitlines() == [f"{name:<15}  {value}" for name, value in published.items()]


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    np.save(tmp_path / "groundtruth.npy", np.eye(4, dtype=bool))
    np.save(tmp_path / "predictions.npy", np.zeros((4, 3)))
    result = _run_cli("--groundtruth", tmp_path / "groundtruth.npy", "--predictions", tmp_path / "predictions.npy")
    assert result.returncode == 2
    assert "error: predictions shape (4, 3) does not match groundtruth shape (4, 4)" in result.stderr
    assert "Traceback" not in result.stderr
