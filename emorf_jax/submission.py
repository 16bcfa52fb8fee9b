"""MediaEval 2019 submissions: `predictions.npy` and `decisions.npy` whose rows are exactly the official test tracks.

The task scores a submission row by row against the test TSV, so a matrix that lacks a track (one that data
preparation could not read, say) or holds them in another order would be scored against the wrong labels. Writing
one is refused unless the rows are the official ones, in TSV order.
"""

import os
from collections.abc import Sequence

import numpy as np


def check_rows(track_ids: Sequence[str], official_track_ids: Sequence[str]) -> None:
    """Raises ValueError naming the missing, extra or misplaced tracks unless the rows are the official ones."""
    if list(track_ids) == list(official_track_ids):
        return
    present, official = set(track_ids), set(official_track_ids)
    missing = [track_id for track_id in official_track_ids if track_id not in present]
    extra = [track_id for track_id in track_ids if track_id not in official]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} official test tracks are missing ({', '.join(missing[:10])}"
            f"{', ...' if len(missing) > 10 else ''})"
        )
    if extra:
        problems.append(f"{len(extra)} rows are not official test tracks ({', '.join(extra[:10])})")
    if not problems:
        problems.append("the rows are not in the test TSV's order")
    raise ValueError(
        f"not a MediaEval submission: {'; '.join(problems)}; a submission has exactly the "
        f"{len(official_track_ids)} tracks of the test TSV, in its order"
    )


def write_submission(
    directory: str,
    predictions: np.ndarray,
    decisions: np.ndarray,
    track_ids: Sequence[str],
    official_track_ids: Sequence[str],
) -> None:
    """Writes `directory/predictions.npy` (float32) and `directory/decisions.npy` (bool), or refuses (ValueError)."""
    check_rows(track_ids, official_track_ids)
    for name, matrix in (("predictions", predictions), ("decisions", decisions)):
        if matrix.shape[0] != len(track_ids):
            raise ValueError(f"{name} has {matrix.shape[0]} rows for {len(track_ids)} track ids")
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, "predictions.npy"), np.asarray(predictions, np.float32))
    np.save(os.path.join(directory, "decisions.npy"), np.asarray(decisions, bool))
