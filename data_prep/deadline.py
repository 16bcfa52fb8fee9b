"""How long decoding and features may take for one audio file before the process holding it is killed: a read that
never returns (a named pipe, a hung network mount) or a stuck decoder must not stop a data-preparation build
(`worker_pool`) or a tagging run (`emorf_jax.predict`) for good.

The floor covers a fresh process's start-up (spawn and imports: about 0.6 s of CPU, several times that on a loaded
machine) and a short file; the part per audio second is 25-45 times the measured cost of decoding plus features
(1/450 to 1/250 s of CPU per audio second: benchmarks/RESULTS.md, "Data preparation"), so a slow but healthy file is
never cut: 81 s for the median 206-s track, 19 min for a three-hour file.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Deadline:
    """`floor_s` plus `seconds_per_audio_second` per second of a file's duration."""

    floor_s: float = 60.0
    seconds_per_audio_second: float = 0.1

    def __post_init__(self) -> None:
        if self.floor_s <= 0 or self.seconds_per_audio_second < 0:
            raise ValueError(
                f"deadline floor {self.floor_s} s, {self.seconds_per_audio_second} s per audio second: the floor must "
                "be positive and the part per audio second not negative"
            )

    def seconds(self, duration: float | None) -> float:
        """The deadline of a file of `duration` seconds (None: not known yet, the floor alone)."""
        return self.floor_s + self.seconds_per_audio_second * (duration or 0.0)


DEFAULT_DEADLINE = Deadline()
