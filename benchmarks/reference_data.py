"""Where the tests and benchmarks find the real MTG-Jamendo metadata and the official MediaEval 2019 results.

`EMORF_REFERENCE_DATA` names the folder, by default `shared/` beside the repository. It holds
`mtg-jamendo/data/` (the dataset repository's `data/` folder), and `mediaeval2019/` with `groundtruth.npy` (the task
repository's `src/groundtruth.npy`), `CP-JKU/<run>/` and `CP-JKU/results.tsv` (its `submissions/CP-JKU/` and the
official scores), `baseline/vggish/` and `baseline/results.tsv` (the organisers' baseline run and scores). What is
absent is skipped, with this folder named in the reason.
"""

import os
from pathlib import Path

ROOT = Path(os.environ.get("EMORF_REFERENCE_DATA") or Path(__file__).resolve().parents[2] / "shared")
MTG_JAMENDO_METADATA = ROOT / "mtg-jamendo" / "data"
MEDIAEVAL2019 = ROOT / "mediaeval2019"
