"""MediaEval submissions are written only with exactly the official test rows, in TSV order."""

import numpy as np
import pytest

from emorf_jax import submission

OFFICIAL = [f"track_{n:07d}" for n in range(1, 6)]


def test_a_submission_with_the_official_rows_is_written(tmp_path):
    predictions = np.linspace(0, 1, 15).reshape(5, 3)
    submission.write_submission(str(tmp_path), predictions, predictions > 0.5, OFFICIAL, OFFICIAL)
    np.testing.assert_array_equal(np.load(tmp_path / "predictions.npy"), predictions.astype(np.float32))
    assert np.load(tmp_path / "decisions.npy").dtype == bool


@pytest.mark.parametrize(
    "rows, message",
    [
        (OFFICIAL[:2] + OFFICIAL[3:], r"1 official test tracks are missing \(track_0000003\)"),
        (OFFICIAL + ["track_0000099"], r"1 rows are not official test tracks \(track_0000099\)"),
        (OFFICIAL[::-1], "not in the test TSV's order"),
    ],
)
def test_other_rows_are_refused_naming_the_tracks(tmp_path, rows, message):
    matrix = np.zeros((len(rows), 3))
    with pytest.raises(ValueError, match=message):
        submission.write_submission(str(tmp_path), matrix, matrix > 0, rows, OFFICIAL)
    assert not (tmp_path / "predictions.npy").exists()
