"""`metrics.calibration` and `evaluate --calibration`: the submitted runs' figures, cases with a known answer, bad
input."""

import json
import math

import numpy as np
import pytest
from scipy import optimize, special

from benchmarks import reference_data
from emorf_jax import evaluate, metrics

MEDIAEVAL = reference_data.MEDIAEVAL2019
needs_shared = pytest.mark.skipif(
    not (MEDIAEVAL / "groundtruth.npy").is_file(),
    reason=f"{MEDIAEVAL} (the official ground truth and submitted runs) is absent",
)

# On the official test set (4,231 tracks, 56 tags, positive rate 0.0319), as docs/evaluation.md and docs/fidelity.md
# give them: (run, mean probability, median odds ratio, logistic intercept, logistic slope). The FA runs' odds are
# 7-9 times too high (BCE with a positive weight), the other codebase's CRNN and ResNet-34 and the organisers'
# VGG-ish are near calibrated.
SUBMISSIONS = [
    ("CP-JKU/1_shakefaresnet", 0.1963, 9.07, -1.8881, 1.3397),
    ("CP-JKU/2_faresnet", 0.1585, 6.90, -1.5284, 1.3019),
    ("CP-JKU/3_avg_ensemble", 0.1948, 8.92, -1.8783, 1.3443),
    ("CP-JKU/4_crnn", 0.0301, 1.02, -0.2289, 0.8980),
    ("CP-JKU/5_resnet34", 0.0337, 1.02, -0.3570, 0.8957),
    ("baseline/vggish", 0.0252, 0.79, -0.5032, 0.7486),
]


def _evaluate(capsys, *arguments: str) -> str:
    assert evaluate.main(["--groundtruth", str(MEDIAEVAL / "groundtruth.npy"), *arguments]) == 0
    return capsys.readouterr().out


def _calibration_from_definitions(truth: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """The figures of `metrics.calibration` computed here from their definitions, another way: the fit by scipy's
    BFGS on the log-likelihood rather than a Newton solver (every tag of the official test set has both classes)."""
    y, p = truth.astype(np.float64), probabilities.astype(np.float64)
    odds_ratios = np.exp(special.logit(p.mean(axis=0)) - special.logit(y.mean(axis=0)))  # logit: the log odds
    logits = special.logit(np.clip(p, 1e-6, 1 - 1e-6)).ravel()

    def negative_log_likelihood(coefficients: np.ndarray) -> tuple[float, np.ndarray]:
        z = coefficients[0] + coefficients[1] * logits
        residual = special.expit(z) - y.ravel()
        return float(np.sum(np.logaddexp(0, z) - y.ravel() * z)), np.array([residual.sum(), residual @ logits])

    fit = optimize.minimize(negative_log_likelihood, [0.0, 1.0], jac=True, method="BFGS", options={"gtol": 1e-8})
    return {
        "mean-probability": p.mean(),
        "positive-rate": y.mean(),
        "median-odds-ratio": float(np.median(odds_ratios)),
        "calibration-intercept": float(fit.x[0]),
        "calibration-slope": float(fit.x[1]),
    }


@needs_shared
@pytest.mark.parametrize("run, mean, odds_ratio, intercept, slope", SUBMISSIONS)
def test_the_submitted_runs_calibration(run, mean, odds_ratio, intercept, slope):
    """The table is what the submitted predictions and the ground truth give, and `metrics.calibration` gives it."""
    truth, probabilities = np.load(MEDIAEVAL / "groundtruth.npy"), np.load(MEDIAEVAL / run / "predictions.npy")
    expected = _calibration_from_definitions(truth, probabilities)
    assert expected["mean-probability"] == pytest.approx(mean, abs=5e-5)
    assert expected["positive-rate"] == pytest.approx(0.0319, abs=5e-5)
    assert expected["median-odds-ratio"] == pytest.approx(odds_ratio, abs=5e-3)
    assert expected["calibration-intercept"] == pytest.approx(intercept, abs=5e-5)
    assert expected["calibration-slope"] == pytest.approx(slope, abs=5e-5)
    figures = metrics.calibration(truth, probabilities)
    assert figures.keys() == expected.keys()
    for name, value in expected.items():
        assert figures[name] == pytest.approx(value, rel=1e-9, abs=1e-6), name


@needs_shared
def test_evaluate_prints_the_calibration_as_json_and_as_a_table(capsys):
    run = str(MEDIAEVAL / "CP-JKU" / "1_shakefaresnet" / "predictions.npy")
    printed = json.loads(_evaluate(capsys, "--predictions", run, "--calibration", "--json"))
    assert printed["PR-AUC-macro"] == pytest.approx(0.148037, abs=5e-7)  # the official figure beside it
    assert round(printed["calibration"]["mean-probability"], 4) == 0.1963
    assert round(printed["calibration"]["median-odds-ratio"], 2) == 9.07
    lines = dict(line.split() for line in _evaluate(capsys, "--predictions", run, "--calibration").splitlines())
    assert lines["mean-probability"] == "0.196258" and lines["positive-rate"] == "0.031924"
    assert lines["median-odds-ratio"] == "9.071100" and lines["calibration-slope"] == "1.339700"
    assert "calibration" not in _evaluate(capsys, "--predictions", run, "--json")  # only when asked for


def _rates_case() -> tuple[np.ndarray, np.ndarray]:
    """Ground truth of 20 tracks whose 4 tags have positive rates 0.1, 0.25, 0.5 and 0.6, and those rates as every
    track's probabilities: calibrated in every tag."""
    rates = np.array([0.1, 0.25, 0.5, 0.6])
    truth = np.arange(20)[:, None] < (rates * 20)[None, :]
    return truth, np.broadcast_to(rates, truth.shape)


def test_each_tags_positive_rate_is_calibrated():
    truth, rates = _rates_case()
    figures = metrics.calibration(truth, rates)
    assert figures["mean-probability"] == pytest.approx(figures["positive-rate"], abs=1e-15)
    assert figures["median-odds-ratio"] == pytest.approx(1.0, abs=1e-12)
    # In each group of equal probability the positive rate is that probability: the fit's optimum is (0, 1).
    assert figures["calibration-intercept"] == pytest.approx(0.0, abs=1e-9)
    assert figures["calibration-slope"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("weight", [0.5, 3.0, 10.0])
def test_odds_scaled_by_w_give_an_odds_ratio_of_w_and_an_intercept_of_minus_log_w(weight):
    truth, rates = _rates_case()
    odds = weight * rates / (1 - rates)
    figures = metrics.calibration(truth, odds / (1 + odds))
    assert figures["median-odds-ratio"] == pytest.approx(weight, rel=1e-12)
    assert figures["calibration-intercept"] == pytest.approx(-math.log(weight), abs=1e-9)
    assert figures["calibration-slope"] == pytest.approx(1.0, abs=1e-9)
    assert (figures["mean-probability"] > figures["positive-rate"]) == (weight > 1)


def test_overconfident_probabilities_have_a_slope_below_one():
    truth, rates = _rates_case()
    logits = np.log(rates / (1 - rates))
    figures = metrics.calibration(truth, 1 / (1 + np.exp(-2 * logits)))  # every logit doubled
    assert figures["calibration-slope"] == pytest.approx(0.5, abs=1e-9)
    assert figures["calibration-intercept"] == pytest.approx(0.0, abs=1e-9)


def test_tags_with_one_class_are_left_out_of_the_median_odds_ratio():
    truth, rates = _rates_case()
    three_times = 3 * rates / (1 - rates)
    scores = np.concatenate([three_times / (1 + three_times), np.full((20, 5), 0.9)], axis=1)
    with pytest.warns(UserWarning, match=r"tags \[4, 5, 6, 7, 8\] have only positive or only negative tracks"):
        figures = metrics.calibration(np.concatenate([truth, np.zeros((20, 5), bool)], axis=1), scores)
    assert figures["median-odds-ratio"] == pytest.approx(3.0, rel=1e-12)  # 0.9 / 0 would be inf


def test_no_finite_fit_gives_nan_rather_than_a_number():
    truth, rates = _rates_case()
    constant = metrics.calibration(truth, np.full(truth.shape, 0.3))  # no spread of the logit
    assert math.isnan(constant["calibration-slope"]) and math.isnan(constant["calibration-intercept"])
    assert constant["mean-probability"] == pytest.approx(0.3)
    separated = metrics.calibration(truth, np.where(truth, 0.8, 0.2))  # the logit sorts every entry
    assert math.isnan(separated["calibration-slope"]) and math.isnan(separated["calibration-intercept"])


@pytest.mark.parametrize("bad, shown", [(1.5, r"\[0.1, 1.5\]"), (-0.25, r"\[-0.25, 0.6\]")])
def test_probabilities_outside_zero_one_are_refused(bad, shown, tmp_path, capsys):
    truth, rates = _rates_case()
    scores = np.array(rates)
    scores[3, 2] = bad
    with pytest.raises(ValueError, match=rf"predictions have values in {shown}, outside the probabilities' \[0, 1\]"):
        metrics.calibration(truth, scores)
    np.save(tmp_path / "groundtruth.npy", truth)
    np.save(tmp_path / "predictions.npy", scores)
    arguments = ["--groundtruth", str(tmp_path / "groundtruth.npy"), "--predictions", str(tmp_path / "predictions.npy")]
    with pytest.raises(SystemExit) as exit_:
        evaluate.main([*arguments, "--calibration"])
    assert exit_.value.code == 2
    assert "outside the probabilities' [0, 1]" in capsys.readouterr().err
    assert evaluate.main(arguments) == 0  # ranking figures need no probabilities
