"""A synthetic MTG-Jamendo: real MP3s and metadata in the real layout, with tags planted in the audio.

The real audio (152 GB) is out of reach, so the pipeline (decoding, features, shards, training, evaluation)
is exercised on a small tree that has the real dataset's layout and file formats::

    OUT/audio/NN/ID.mp3                    MPEG-1 Layer III, 44.1 kHz, stereo
    OUT/data/autotagging_moodtheme.tsv     every track (CRLF, variable tag columns, sorted by track id)
    OUT/data/splits/split-0/autotagging_moodtheme-{train,validation,test}.tsv   artist-disjoint, ~55/20/25 %
    OUT/data/tags/moodtheme_split.txt      the label columns (alphabetical, like the real file)
    OUT/data/tags/moodtheme.txt            every tag of the full TSV

Run ``python -m data_prep.synthetic --out DIR --tracks N --seed S`` (__main__.py); the same arguments give
byte-identical files. The tags are real MTG-Jamendo mood/theme names, each planted by a layer of sound that lasts the
whole track, so that any ~3 s crop carries the evidence. With ``subset`` (``--subset genre|instrument|top50tags``)
the same rules plant real names of that subset instead (``SUBSET_TAGS``: ``film`` is ``genre---soundtrack``,
``instrument---strings``, ``mood/theme---film``, ...), in that subset's file names (``autotagging_genre*.tsv``;
``tags/top50.txt`` for top-50, no tag list for genre and instrument, whose columns are their split's tags): the same
seed gives the same audio and split for every subset. The rules, by their mood/theme names:

* ``deep`` (register): every track has a melody of pure-tone notes (0.15-0.45 s, vibrato of +-1 semitone)
  within +-2 semitones of a centre; the centre is 1.2-1.4 kHz for ``deep`` tracks and a fifth higher
  (1.8-2.1 kHz) for the others. Offsets, vibrato, lengths and levels follow the same distribution and both
  registers lie where the Slaney mel scale is logarithmic (> 1 kHz), far from the spectrogram's edges, so a
  deep melody is the other kind shifted along the mel axis: only the absolute register tells the tag. The
  frequency-aware channel reads it directly; a translation-invariant network only has indirect hints (a
  partial's width in mel bands, per-band normalisation statistics).
* ``fast`` (tempo): every track that is not ``calm`` has noise-burst percussion (2-12 kHz) on a steady beat;
  150-180 BPM for ``fast`` tracks, 70-110 BPM for the others.
* ``calm``: no percussion and no ``heavy`` layer (so never together with ``fast`` or ``heavy``).
* ``film``: a sustained string-like pad, chords of three harmonic tones (f0 260-520 Hz, 8 harmonics, slow
  vibrato), a new chord every 2-3 s.
* ``nature``: bird chirps, 80 ms upward sweeps from 2.5-4.5 kHz, about four per second at random times.
* ``christmas``: struck bells with inharmonic partials (f0 0.9-1.4 kHz) on a steady 0.4-0.7 s pulse.
* ``heavy``: chugging band noise (300-3000 Hz) gated at 7-9 Hz.
* ``space``: a sine gliding slowly (period 2-4 s) half an octave around 1.5-2.5 kHz, with an echo.
* ``retro``: an 8-bit square-wave arpeggio (root 250-450 Hz, major triad, 8-10 notes per second).

Distractors that carry no tag: background noise whose level and slope (white to pink) belong to the
artist, random clicks (Poisson, about one per second) and, for half of the artists, a steady sine drone at
1-4 kHz. Each tag's layer varies in level by +-5 dB from track to track, each layer gets its own stereo
pan, and the mix is peak-normalised.

Tag frequencies are imbalanced like the real ones: about film 30 %, fast 27 %, deep 20 %, calm 17 %,
space 9 %, nature 8 %, retro 8 %, heavy 6 %, christmas 5 % of the tracks. A track has 1 to 3 tags, most
often one (the real TSV has no untagged rows). Half of an artist's tracks share the artist's signature tag
set, so tags correlate within an artist as in the real data. Like the real subset, some tracks (about 3 %)
are listed only in the full TSV, with a tag outside the label columns (``mellow``), and are in no split.
The split tries a few artist orders and keeps the first that puts every tag in every part.

Quality issues copied from the real data on purpose: ``duplicate_groups`` pairs of byte-identical MP3s
whose tags differ (label noise): the first pair has its original in train and its copy in test under
another artist, the second pair both in train; the copy's own tags do not follow the rules above. Track lengths
have the real shape, scaled: log-normal around ``duration`` (the median) with the real split-0 training set's
log-spread (``LENGTH_LOG_STD``), clipped to the real shortest and longest track relative to the median (30 s and
44 min for a median of 206 s), so that most tracks span several stored chunks and end in a short tail; a few extra
tracks (``long_tracks``) last 30-50 s.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile

from data_prep import metadata, worker_pool

SAMPLE_RATE = 44100
TAG_PREFIX = "mood/theme" + metadata.TAG_SEPARATOR
# Per-track draw probabilities; after the constraints of _draw_tags they give the frequencies in the docstring.
TAG_PROBABILITIES: dict[str, float] = {
    "calm": 0.11,
    "christmas": 0.03,
    "deep": 0.11,
    "fast": 0.17,
    "film": 0.17,
    "heavy": 0.04,
    "nature": 0.045,
    "retro": 0.045,
    "space": 0.05,
}
RULES: tuple[str, ...] = tuple(sorted(TAG_PROBABILITIES))
DROPPED_NAME = "mellow"  # in the full TSV only, like the real ambiental/horror/mellow
# The real tag of each subset that each rule plants (its sound suits the tag where the subset has such a tag), and
# the tag of the tracks left out of the split (DROPPED_NAME's).
SUBSET_TAGS: dict[str, dict[str, str]] = {
    "moodtheme": {name: TAG_PREFIX + name for name in (*RULES, DROPPED_NAME)},
    "genre": {
        "calm": "genre---ambient",
        "christmas": "genre---classical",
        "deep": "genre---deephouse",
        "fast": "genre---drumnbass",
        "film": "genre---soundtrack",
        "heavy": "genre---metal",
        "nature": "genre---newage",
        "retro": "genre---synthpop",
        "space": "genre---psychedelic",
        DROPPED_NAME: "genre---chanson",
    },
    "instrument": {
        "calm": "instrument---piano",
        "christmas": "instrument---bell",
        "deep": "instrument---cello",
        "fast": "instrument---drums",
        "film": "instrument---strings",
        "heavy": "instrument---electricguitar",
        "nature": "instrument---flute",
        "retro": "instrument---computer",
        "space": "instrument---synthesizer",
        DROPPED_NAME: "instrument---accordion",
    },
    "top50tags": {
        "calm": "mood/theme---relaxing",
        "christmas": "genre---classical",
        "deep": "instrument---bass",
        "fast": "mood/theme---energetic",
        "film": "mood/theme---film",
        "heavy": "genre---metal",
        "nature": "genre---newage",
        "retro": "instrument---synthesizer",
        "space": "genre---ambient",
        DROPPED_NAME: "mood/theme---dark",
    },
}


def label_tags(subset: str = metadata.DEFAULT_SUBSET) -> tuple[str, ...]:
    """The planted tags of a subset, alphabetically: its label columns when every one is in the split."""
    return tuple(sorted(SUBSET_TAGS[subset][name] for name in RULES))


LABEL_TAGS: tuple[str, ...] = label_tags()
DROPPED_TAG = SUBSET_TAGS[metadata.DEFAULT_SUBSET][DROPPED_NAME]
DROPPED_FRACTION = 0.03
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.55, "validation": 0.20, "test": 0.25}
MAX_TAGS_PER_TRACK = 3
# The real split-0 training durations (9,949 tracks): median 205.7 s, standard deviation of log(duration) 0.597,
# shortest 30 s, longest 2,645 s. Synthetic lengths keep that shape around their own median.
LENGTH_LOG_STD = 0.6
LENGTH_RANGE = (30.0 / 205.7, 2645.0 / 205.7)
MIN_DURATION = 2.0
_SPLIT_ATTEMPTS = 64


@dataclasses.dataclass(frozen=True)
class ArtistStyle:
    """Tag-free sound of an artist: distractors that a model may memorise but must not rely on."""

    noise_level: float  # RMS of the background noise
    noise_slope: float  # 0 = white, 1 = pink
    drone_hz: float | None  # a steady sine, or none


@dataclasses.dataclass(frozen=True)
class TrackPlan:
    """Everything that fixes one track's metadata and audio."""

    number: int  # the numeric part of the track id
    artist_number: int
    album_number: int
    duration: float  # seconds, one decimal
    tags: tuple[str, ...]  # rule names, e.g. "calm"
    style: ArtistStyle
    copy_of: int | None = None  # the track whose MP3 bytes this one repeats

    @property
    def track_id(self) -> str:
        return f"track_{self.number:07d}"

    @property
    def path(self) -> str:
        return metadata.audio_path_for(self.track_id)

    def track(self, subset: str = metadata.DEFAULT_SUBSET) -> metadata.Track:
        """The track's row of the metadata TSVs, with the tag names of ``subset``."""
        return metadata.Track(
            track_id=self.track_id,
            artist_id=f"artist_{self.artist_number:06d}",
            album_id=f"album_{self.album_number:06d}",
            path=self.path,
            duration=self.duration,
            tags=tuple(SUBSET_TAGS[subset][tag] for tag in self.tags),
            line=0,
        )


# ---------------------------------------------------------------- planning (metadata only)


def _draw_tags(rng: np.random.Generator) -> tuple[str, ...]:
    """Independent draws per tag, redrawn until 1..3 tags and calm without fast/heavy."""
    names = sorted(TAG_PROBABILITIES)
    probabilities = np.array([TAG_PROBABILITIES[name] for name in names])
    while True:
        chosen = tuple(name for name, hit in zip(names, rng.random(len(names)) < probabilities) if hit)
        clash = "calm" in chosen and ("fast" in chosen or "heavy" in chosen)
        if 1 <= len(chosen) <= MAX_TAGS_PER_TRACK and not clash:
            return chosen


def _draw_style(rng: np.random.Generator) -> ArtistStyle:
    drone_hz = float(rng.uniform(1000, 4000)) if rng.random() < 0.5 else None
    return ArtistStyle(
        noise_level=float(10 ** (rng.uniform(-44, -34) / 20)),
        noise_slope=float(rng.uniform(0, 1)),
        drone_hz=drone_hz,
    )


def _artist_sizes(num_tracks: int, rng: np.random.Generator) -> list[int]:
    """Tracks per artist: many artists with a few tracks, some with up to 10, as in the real data."""
    sizes = []
    while sum(sizes) < num_tracks:
        sizes.append(int(min(1 + rng.geometric(0.3), 10, num_tracks - sum(sizes))))
    return sizes


def plan_tracks(
    num_tracks: int,
    seed: int,
    duration: float = 6.0,
    long_tracks: int = 0,
    long_duration: tuple[float, float] = (30.0, 50.0),
    length_log_std: float = LENGTH_LOG_STD,
) -> list[TrackPlan]:
    """The tracks of a synthetic tree (without duplicates), sorted by track id; ``duration`` is the median length
    and ``length_log_std`` the spread of log(length) (0: every track lasts ``duration``)."""
    if num_tracks < 10:
        raise ValueError(f"num_tracks must be at least 10 for three artist-disjoint parts, got {num_tracks}")
    if duration < MIN_DURATION:
        raise ValueError(f"duration must be at least {MIN_DURATION} s, got {duration}")
    rng = np.random.default_rng([seed, 0])
    sizes = _artist_sizes(num_tracks, rng)
    track_numbers = np.sort(rng.choice(np.arange(1000, 1_500_000), num_tracks, replace=False))
    artist_numbers = rng.choice(np.arange(1, 500_000), len(sizes), replace=False)
    album_numbers = iter(rng.choice(np.arange(1, 170_000), 2 * len(sizes), replace=False))
    long_count = long_tracks
    if not 0 <= long_count <= num_tracks:
        raise ValueError(f"long_tracks must be between 0 and num_tracks ({num_tracks}), got {long_tracks}")
    long_indices = set(rng.choice(num_tracks, long_count, replace=False).tolist())
    dropped_indices = set(rng.choice(num_tracks, round(DROPPED_FRACTION * num_tracks), replace=False).tolist())
    plans = []
    # Artists own consecutive track ids, in random order, like uploads of one artist on Jamendo.
    starts = np.cumsum([0, *sizes[:-1]])
    for artist_index in rng.permutation(len(sizes)):
        style = _draw_style(rng)
        signature = _draw_tags(rng)
        albums = [next(album_numbers) for _ in range(1 + int(rng.random() < 0.4))]
        for index in range(starts[artist_index], starts[artist_index] + sizes[artist_index]):
            if index in dropped_indices:
                tags = (DROPPED_NAME,)
            else:
                tags = signature if rng.random() < 0.5 else _draw_tags(rng)
            if index in long_indices:
                length = rng.uniform(*long_duration)
            else:
                low, high = (max(MIN_DURATION, ratio * duration) for ratio in LENGTH_RANGE)
                length = np.clip(duration * np.exp(length_log_std * rng.standard_normal()), low, high)
            plans.append(
                TrackPlan(
                    number=int(track_numbers[index]),
                    artist_number=int(artist_numbers[artist_index]),
                    album_number=int(albums[int(rng.integers(len(albums)))]),
                    duration=round(float(length), 1),
                    tags=tags,
                    style=style,
                )
            )
    return sorted(plans, key=lambda plan: plan.number)


def _greedy_split(artists: Sequence[int], sizes: dict[int, int]) -> dict[int, str]:
    """Each artist, in the given order, to the part that lags its target fraction most."""
    counts = dict.fromkeys(SPLIT_FRACTIONS, 0)
    part_of = {}
    for artist in artists:
        part = min(SPLIT_FRACTIONS, key=lambda name: counts[name] / SPLIT_FRACTIONS[name])
        part_of[artist] = part
        counts[part] += sizes[artist]
    return part_of


def _tags_missing(plans: Sequence[TrackPlan], part_of: dict[int, str]) -> int:
    """How many (part, tag) pairs have no positive track."""
    present = {(part_of[plan.artist_number], tag) for plan in plans for tag in plan.tags}
    return sum((part, tag) not in present for part in SPLIT_FRACTIONS for tag in TAG_PROBABILITIES)


def assign_split(plans: Sequence[TrackPlan], seed: int) -> dict[str, list[TrackPlan]]:
    """Artist-disjoint train/validation/test; among a few artist orders, the first with every tag in every part."""
    in_split = [plan for plan in plans if DROPPED_NAME not in plan.tags]
    sizes: dict[int, int] = {}
    for plan in in_split:
        sizes[plan.artist_number] = sizes.get(plan.artist_number, 0) + 1
    rng = np.random.default_rng([seed, 1])
    best, best_missing = None, None
    for _ in range(_SPLIT_ATTEMPTS):
        # Large artists first (ties in random order), so that the small ones even out the fractions.
        order = sorted(rng.permutation(list(sizes)).tolist(), key=lambda artist: -sizes[artist])
        part_of = _greedy_split(order, sizes)
        missing = _tags_missing(in_split, part_of)
        if best_missing is None or missing < best_missing:
            best, best_missing = part_of, missing
        if missing == 0:
            break
    return {part: [plan for plan in in_split if best[plan.artist_number] == part] for part in SPLIT_FRACTIONS}


def add_duplicates(split: dict[str, list[TrackPlan]], groups: int, seed: int) -> dict[str, list[TrackPlan]]:
    """Turn up to ``groups`` tracks into byte-identical copies of others with different tags.

    Group 1: an original in train, its copy in test (another artist); group 2 on: both in train.
    """
    rng = np.random.default_rng([seed, 2])
    pairs_from = [("train", "test")] + [("train", "train")] * max(groups - 1, 0)
    replaced: dict[int, TrackPlan] = {}
    for source_part, copy_part in pairs_from[:groups]:
        used = set(replaced) | {plan.copy_of for plan in replaced.values()}
        candidates = [
            (original, copy)
            for original in split[source_part]
            for copy in split[copy_part]
            if original.number != copy.number
            and set(original.tags) != set(copy.tags)
            and not {original.number, copy.number} & used
            and max(original.duration, copy.duration) < 20
        ]
        if not candidates:
            continue
        original, copy = candidates[int(rng.integers(len(candidates)))]
        replaced[copy.number] = dataclasses.replace(copy, duration=original.duration, copy_of=original.number)
    return {part: [replaced.get(plan.number, plan) for plan in plans] for part, plans in split.items()}


# ---------------------------------------------------------------- audio (one layer per rule)


def _time(num_samples: int) -> np.ndarray:
    return np.arange(num_samples, dtype=np.float64) / SAMPLE_RATE


def _band_noise(num_samples: int, low_hz: float, high_hz: float, rng: np.random.Generator) -> np.ndarray:
    """White noise restricted to [low_hz, high_hz] in the frequency domain, unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs = np.fft.rfftfreq(num_samples, 1 / SAMPLE_RATE)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    noise = np.fft.irfft(spectrum, num_samples)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _sloped_noise(num_samples: int, slope: float, rng: np.random.Generator) -> np.ndarray:
    """Noise with power ~ f^-slope above 20 Hz (0 = white, 1 = pink), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs = np.maximum(np.fft.rfftfreq(num_samples, 1 / SAMPLE_RATE), 20.0)
    noise = np.fft.irfft(spectrum * freqs ** (-slope / 2), num_samples)
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def _add_events(out: np.ndarray, onsets: np.ndarray, events: Sequence[np.ndarray]) -> None:
    """Add event ``i % len(events)`` at each onset (in samples), cut at the end of ``out``."""
    for index, onset in enumerate(onsets):
        event = events[index % len(events)]
        end = min(len(out), onset + len(event))
        if onset < end:
            out[onset:end] += event[: end - onset]


def _steady_onsets(num_samples: int, period_s: float, rng: np.random.Generator) -> np.ndarray:
    """One onset per period from a random phase, each jittered by up to 5 ms."""
    jitter_s = 0.005
    times = np.arange(rng.uniform(0, period_s), num_samples / SAMPLE_RATE, period_s)
    times = times + rng.uniform(-jitter_s, jitter_s, len(times))
    return np.clip(np.round(times * SAMPLE_RATE).astype(int), 0, num_samples - 1)


def _poisson_onsets(num_samples: int, rate_hz: float, rng: np.random.Generator) -> np.ndarray:
    count = rng.poisson(rate_hz * num_samples / SAMPLE_RATE)
    return np.sort(rng.integers(0, num_samples, count))


def melody(num_samples: int, deep: bool, rng: np.random.Generator) -> np.ndarray:
    """Pure-tone notes around a centre of 1.2-1.4 kHz (deep) or a fifth higher; same statistics otherwise.

    Offsets and vibrato are in semitones and both registers lie where the mel scale is logarithmic, so with
    the same random draws a deep melody is exactly the other one shifted down along the mel axis.
    """
    centre = rng.uniform(1200, 1400) * (1 if deep else 1.5)
    out = np.zeros(num_samples)
    start = 0
    while start < num_samples:
        length = int(rng.uniform(0.15, 0.45) * SAMPLE_RATE)
        t = _time(length)
        semitones = rng.uniform(-2, 2) + np.sin(2 * np.pi * rng.uniform(5, 7) * t)
        phase = 2 * np.pi * np.cumsum(centre * 2 ** (semitones / 12)) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi)
        envelope = np.minimum(t / 0.01, 1.0) * np.exp(-t / 0.3)
        end = min(num_samples, start + length)
        out[start:end] += (envelope * np.sin(phase))[: end - start]
        start = end + int(rng.uniform(0, 0.1) * SAMPLE_RATE)
    return 0.2 * 10 ** (rng.uniform(-4, 4) / 20) * out


def percussion(num_samples: int, fast: bool, rng: np.random.Generator) -> np.ndarray:
    """Decaying 2-12 kHz noise bursts on a steady beat: 150-180 BPM if fast, else 70-110 BPM."""
    bpm = rng.uniform(150, 180) if fast else rng.uniform(70, 110)
    burst_length = int(0.15 * SAMPLE_RATE)
    decay = np.exp(-_time(burst_length) / 0.04)
    bursts = [decay * _band_noise(burst_length, 2000, 12000, rng) for _ in range(4)]
    out = np.zeros(num_samples)
    _add_events(out, _steady_onsets(num_samples, 60 / bpm, rng), bursts)
    return 0.3 * out


def _harmonic_tone(phase: np.ndarray, amplitudes: Sequence[float]) -> np.ndarray:
    """Sum of ``amplitudes[k-1] * sin(k * phase)``, by sin((k+1)x) = 2 cos(x) sin(kx) - sin((k-1)x): one sine only."""
    two_cos = 2 * np.cos(phase)
    previous, current = np.zeros_like(phase), np.sin(phase)
    out = amplitudes[0] * current
    for amplitude in amplitudes[1:]:
        previous, current = current, two_cos * current - previous
        if amplitude:
            out += amplitude * current
    return out


def pad(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Film: sustained three-note chords of harmonic tones (f0 260-520 Hz), each faded in and out over 2-3 s."""
    out = np.zeros(num_samples)
    harmonics = [1 / k for k in range(1, 9)]
    start = 0
    while start < num_samples:
        length = min(num_samples - start, int(rng.uniform(2.0, 3.0) * SAMPLE_RATE))
        fade = min(int(0.3 * SAMPLE_RATE), length // 2)
        t = _time(length)
        envelope = np.minimum(1.0, np.minimum(np.arange(length) + 1, length - np.arange(length)) / fade)
        for f0 in rng.uniform(260, 520, 3):
            vibrato = 0.003 * np.sin(2 * np.pi * rng.uniform(4, 6) * t)
            phase = 2 * np.pi * f0 * np.cumsum(1 + vibrato) / SAMPLE_RATE
            out[start : start + length] += envelope * _harmonic_tone(phase, harmonics)
        start += length
    return 0.03 * out


def bird_chirps(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Nature: 80 ms upward sweeps starting at 2.5-4.5 kHz, about four per second."""
    length = int(0.08 * SAMPLE_RATE)
    t = _time(length)
    chirps = []
    for _ in range(6):
        start_hz = rng.uniform(2500, 4500)
        end_hz = start_hz * rng.uniform(1.3, 1.6)
        phase = 2 * np.pi * (start_hz * t + (end_hz - start_hz) * t**2 / (2 * t[-1]))
        chirps.append(np.hanning(length) * np.sin(phase))
    out = np.zeros(num_samples)
    _add_events(out, _poisson_onsets(num_samples, 4.0, rng), chirps)
    return 0.12 * out


def bells(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Christmas: struck bells with inharmonic partials (f0 0.9-1.4 kHz) on a steady 0.4-0.7 s pulse."""
    length = int(1.2 * SAMPLE_RATE)
    t = _time(length)
    partials = ((1.0, 1.0), (2.0, 0.6), (2.76, 0.5), (5.40, 0.3), (8.93, 0.2))
    strikes = []
    for f0 in rng.uniform(900, 1400, 3):
        tone = sum(amplitude * np.sin(2 * np.pi * ratio * f0 * t) for ratio, amplitude in partials)
        strikes.append(np.exp(-t / 0.4) * tone)
    out = np.zeros(num_samples)
    _add_events(out, _steady_onsets(num_samples, rng.uniform(0.4, 0.7), rng), strikes)
    return 0.06 * out


def chugs(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Heavy: 300-3000 Hz band noise gated on and off at 7-9 Hz, like palm-muted distorted guitar."""
    t = _time(num_samples)
    gate = np.clip(4 * np.sin(2 * np.pi * rng.uniform(7, 9) * t + rng.uniform(0, 2 * np.pi)) + 1, 0, 1)
    return 0.2 * gate * _band_noise(num_samples, 300, 3000, rng)


def glides(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Space: a sine gliding half an octave around 1.5-2.5 kHz with a 2-4 s period, plus an echo."""
    t = _time(num_samples)
    frequency = rng.uniform(1500, 2500) * 2 ** (0.5 * np.sin(2 * np.pi * t / rng.uniform(2, 4) + rng.uniform(0, 6.3)))
    tone = np.sin(2 * np.pi * np.cumsum(frequency) / SAMPLE_RATE)
    delay = int(0.25 * SAMPLE_RATE)
    tone[delay:] += 0.5 * tone[:-delay]
    return 0.08 * tone


def arpeggio(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Retro: square-wave notes (odd harmonics) cycling a major triad at 8-10 notes per second."""
    note_length = int(SAMPLE_RATE / rng.uniform(8, 10))
    t = _time(note_length)
    envelope = np.exp(-t / 0.05)
    square_harmonics = [1 / k if k % 2 else 0.0 for k in range(1, 10)]
    starts = range(0, num_samples, note_length)
    roots = rng.uniform(250, 450, len(starts) // 24 + 1)  # a new root every 24 notes
    out = np.zeros(num_samples)
    for index, start in enumerate(starts):
        frequency = roots[index // 24] * (1.0, 1.26, 1.5)[index % 3]
        note = envelope * _harmonic_tone(2 * np.pi * frequency * t, square_harmonics)
        end = min(num_samples, start + note_length)
        out[start:end] = note[: end - start]
    return 0.08 * out


def distractors(num_samples: int, style: ArtistStyle, rng: np.random.Generator) -> np.ndarray:
    """Tag-free sound: the artist's background noise, random clicks, the artist's drone."""
    out = style.noise_level * _sloped_noise(num_samples, style.noise_slope, rng)
    clicks = [np.exp(-_time(256) / 0.002) * rng.standard_normal(256) for _ in range(3)]
    _add_events(out, _poisson_onsets(num_samples, 1.0, rng), [0.2 * click for click in clicks])
    if style.drone_hz is not None:
        out += 0.02 * np.sin(2 * np.pi * style.drone_hz * _time(num_samples))
    return out


_TAG_LAYERS = {
    "film": pad,
    "nature": bird_chirps,
    "christmas": bells,
    "heavy": chugs,
    "space": glides,
    "retro": arpeggio,
}


def render_track(plan: TrackPlan, seed: int) -> np.ndarray:
    """The stereo float32 waveform (samples, 2) of a track, as its tags prescribe."""
    rng = np.random.default_rng([seed, 3, plan.number])
    num_samples = round(plan.duration * SAMPLE_RATE)
    layers = [melody(num_samples, "deep" in plan.tags, rng), distractors(num_samples, plan.style, rng)]
    if "calm" not in plan.tags:
        layers.append(percussion(num_samples, "fast" in plan.tags, rng))
    # Each tag's layer at a level within +-5 dB, so that loudness alone does not name a tag.
    for tag, make in _TAG_LAYERS.items():
        if tag in plan.tags:
            layers.append(10 ** (rng.uniform(-5, 5) / 20) * make(num_samples, rng))
    stereo = np.zeros((num_samples, 2))
    for layer in layers:
        angle = np.pi / 4 + rng.uniform(-0.35, 0.35)
        stereo += np.sqrt(2) * layer[:, None] * np.array([np.cos(angle), np.sin(angle)])
    return (0.89 / np.max(np.abs(stereo)) * stereo).astype(np.float32)


def write_mp3(path: Path, waveform: np.ndarray) -> None:
    """MPEG-1 Layer III at 44.1 kHz with libsndfile's default (variable, ~140 kbit/s) bitrate.

    The real files are 320 kbit/s CBR; the default encodes about 1.5 times as fast, and the format is the same.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, waveform, SAMPLE_RATE, format="MP3")


def _render_and_write(plan: TrackPlan, seed: int, audio_dir: Path) -> None:
    write_mp3(audio_dir / plan.path, render_track(plan, seed))


# ---------------------------------------------------------------- the tree


def _write_tsv(path: Path, plans: Sequence[TrackPlan], subset: str) -> None:
    """A metadata TSV as the real ones, sorted by track id."""
    metadata.write_tracks(path, [plan.track(subset) for plan in sorted(plans, key=lambda p: p.number)])


def _write_audio(plans: Sequence[TrackPlan], seed: int, audio_dir: Path, workers: int) -> None:
    """Renders every original track in worker processes (`worker_pool.run_all`, longest first, so that a long track
    does not finish alone at the end), then copies the duplicates; worker_pool.JobsFailed names tracks that failed."""
    originals = [plan for plan in plans if plan.copy_of is None]
    worker_pool.run_all(functools.partial(_render_and_write, seed=seed, audio_dir=audio_dir), originals, workers)
    by_number = {plan.number: plan for plan in plans}
    for plan in plans:
        if plan.copy_of is not None:
            (audio_dir / plan.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(audio_dir / by_number[plan.copy_of].path, audio_dir / plan.path)


def make_synthetic(
    out_dir: metadata.PathLike,
    num_tracks: int = 300,
    seed: int = 0,
    duration: float = 6.0,
    long_tracks: int = 0,
    duplicate_groups: int = 2,
    workers: int | None = None,
    length_log_std: float = LENGTH_LOG_STD,
    subset: str = metadata.DEFAULT_SUBSET,
    with_audio: bool = True,
) -> None:
    """Write ``out_dir/audio`` and ``out_dir/data`` with the tag names of an MTG-Jamendo ``subset`` (see the module
    docstring); refuses to overwrite a tree. Without ``with_audio``, ``data`` only: the same arguments give the same
    audio for every subset, so another subset's tree of them has it."""
    if subset not in metadata.SUBSETS:
        raise ValueError(f"unknown subset {subset!r}; expected one of {metadata.SUBSETS}")
    out_dir = Path(out_dir)
    audio_dir, data_dir = out_dir / "audio", out_dir / "data"
    for existing in (audio_dir, data_dir) if with_audio else (data_dir,):
        if existing.exists():
            raise FileExistsError(f"{existing} already exists; remove it or choose another output directory")
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    plans = plan_tracks(num_tracks, seed, duration, long_tracks, length_log_std=length_log_std)
    split = add_duplicates(assign_split(plans, seed), duplicate_groups, seed)
    replaced = {plan.number: plan for part in split.values() for plan in part}
    plans = [replaced.get(plan.number, plan) for plan in plans]
    if with_audio:
        _write_audio(plans, seed, audio_dir, workers)
    _write_tsv(metadata.full_tsv_path(data_dir, subset), plans, subset)
    for part, part_plans in split.items():
        _write_tsv(metadata.split_tsv_path(data_dir, 0, part, subset), part_plans, subset)
    tag_list = metadata.tag_list_path(data_dir, subset)
    if tag_list is not None:
        metadata.write_tag_list(tag_list, label_tags(subset))
    if subset == metadata.DEFAULT_SUBSET:
        metadata.write_tag_list(data_dir / "tags" / "moodtheme.txt", sorted({*LABEL_TAGS, DROPPED_TAG}))
