"""The synthetic MTG-Jamendo: layout and formats of the real dataset, determinism, splits, planted rules."""

import collections
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from benchmarks import reference_data
from data_prep import metadata, synthetic

REAL_METADATA = reference_data.MTG_JAMENDO_METADATA
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.make_synthetic(out, num_tracks=20, seed=3, duration=2.0, long_tracks=1, workers=1)
    return out


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def all_tracks(tree: Path) -> list[metadata.Track]:
    return metadata.read_tracks(metadata.full_tsv_path(tree / "data"))


def copied_track_ids(tree: Path) -> set[str]:
    """Tracks whose MP3 bytes also belong to another track."""
    by_digest = collections.defaultdict(list)
    for track in all_tracks(tree):
        by_digest[hashlib.sha256((tree / "audio" / track.path).read_bytes()).hexdigest()].append(track.track_id)
    return {track_id for group in by_digest.values() if len(group) > 1 for track_id in group}


def test_tsvs_are_crlf_with_the_real_header_and_variable_tag_columns(tree):
    data = tree / "data"
    tsvs = [metadata.full_tsv_path(data)] + [metadata.split_tsv_path(data, 0, part) for part in metadata.SPLIT_PARTS]
    for tsv in tsvs:
        raw = tsv.read_bytes()
        assert raw.startswith(b"TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\r\n")
        assert raw.endswith(b"\r\n") and raw.count(b"\n") == raw.count(b"\r\n")
    rows = metadata.full_tsv_path(data).read_text().splitlines()[1:]
    assert len(rows) == 20
    assert len({row.count("\t") for row in rows}) >= 2  # 1 to 3 tag columns
    tracks = all_tracks(tree)
    assert [track.track_id for track in tracks] == sorted(track.track_id for track in tracks)
    assert all(f"{track.duration:.1f}" == row.split("\t")[4] for track, row in zip(tracks, rows))


def test_every_listed_track_is_a_44k_stereo_mp3_of_its_duration(tree):
    tracks = all_tracks(tree)
    mp3_files = sorted((tree / "audio").rglob("*.mp3"))
    assert len(mp3_files) == len(tracks)
    for track in tracks:
        path = tree / "audio" / track.path
        assert path.parent.name == f"{int(track.track_id[6:]) % 100:02d}"
        info = soundfile.info(path)
        assert (info.format, info.samplerate, info.channels) == ("MP3", 44100, 2)
        assert info.frames == round(track.duration * 44100)
    longest = max(tracks, key=lambda track: track.duration)
    assert 30.0 <= longest.duration <= 50.0
    waveform, sample_rate = soundfile.read(tree / "audio" / longest.path, dtype="float32")
    assert sample_rate == 44100 and waveform.shape == (round(longest.duration * 44100), 2)
    assert 0.1 < np.abs(waveform).max() <= 1.0


def test_librosa_decodes_the_mp3(tree):
    librosa = pytest.importorskip("librosa")
    track = all_tracks(tree)[0]
    waveform, sample_rate = librosa.load(tree / "audio" / track.path, sr=None, mono=False)
    assert sample_rate == 44100 and waveform.shape == (2, round(track.duration * 44100))


def test_split_0_is_artist_disjoint_and_uses_only_the_label_tags(tree):
    data = tree / "data"
    assert metadata.read_tag_list(data) == synthetic.LABEL_TAGS
    parts = {part: metadata.read_split(data, 0, part) for part in metadata.SPLIT_PARTS}
    artists = {part: {track.artist_id for track in tracks} for part, tracks in parts.items()}
    assert all(artists.values())
    assert not artists["train"] & artists["validation"]
    assert not artists["train"] & artists["test"]
    assert not artists["validation"] & artists["test"]
    full = {track.track_id: track for track in all_tracks(tree)}
    in_split = [track for tracks in parts.values() for track in tracks]
    assert all(full[track.track_id].tags == track.tags for track in in_split)
    left_out = set(full) - {track.track_id for track in in_split}
    assert left_out and all(full[track_id].tags == (synthetic.DROPPED_TAG,) for track_id in left_out)
    assert len(parts["train"]) > len(parts["test"]) > 0 and len(parts["validation"]) > 0
    assert all(1 <= len(track.tags) <= 3 for track in in_split)
    artist_sizes = collections.Counter(track.artist_id for track in full.values())
    assert max(artist_sizes.values()) > 1


def test_duplicates_are_byte_identical_with_different_tags(tree):
    train = {track.track_id: track for track in metadata.read_split(tree / "data", 0, "train")}
    test = {track.track_id: track for track in metadata.read_split(tree / "data", 0, "test")}
    by_digest = collections.defaultdict(list)
    for track in all_tracks(tree):
        by_digest[hashlib.sha256((tree / "audio" / track.path).read_bytes()).hexdigest()].append(track)
    groups = [group for group in by_digest.values() if len(group) > 1]
    assert len(groups) == 2 and all(len(group) == 2 for group in groups)
    for original, copy in groups:
        assert set(original.tags) != set(copy.tags)
    assert any(
        {track.track_id for track in group} & set(train) and {track.track_id for track in group} & set(test)
        for group in groups
    )


def spectral_centroid(signal: np.ndarray) -> float:
    power = np.abs(np.fft.rfft(signal)) ** 2
    return float(np.sum(np.fft.rfftfreq(len(signal), 1 / synthetic.SAMPLE_RATE) * power) / np.sum(power))


def test_deep_melody_is_the_same_melody_a_fifth_lower():
    """With the same draws, only the register differs: the spectral centroid scales by exactly 2/3."""
    num_samples = 4 * synthetic.SAMPLE_RATE
    deep = synthetic.melody(num_samples, True, np.random.default_rng(7))
    other = synthetic.melody(num_samples, False, np.random.default_rng(7))
    assert np.isclose(np.sqrt(np.mean(deep**2)), np.sqrt(np.mean(other**2)), rtol=0.01)
    assert 1000 < spectral_centroid(deep) < 1700 and 1500 < spectral_centroid(other) < 2550
    assert spectral_centroid(other) / spectral_centroid(deep) == pytest.approx(1.5, rel=0.01)


def test_register_rule_holds_in_the_audio_files(tree):
    """In tracks without other tonal layers, deep melodies put their energy at 1.0-1.45 kHz, others at 1.75-2.6 kHz."""
    copies = copied_track_ids(tree)
    no_tonal_layer = {"mood/theme---calm", "mood/theme---deep", "mood/theme---fast", synthetic.DROPPED_TAG}
    log_ratio = {True: [], False: []}
    for track in all_tracks(tree):
        if track.track_id in copies or not set(track.tags) <= no_tonal_layer:
            continue
        waveform, sample_rate = soundfile.read(tree / "audio" / track.path, dtype="float32")
        power = np.abs(np.fft.rfft(waveform.mean(axis=1))) ** 2
        freqs = np.fft.rfftfreq(len(waveform), 1 / sample_rate)
        low = power[(freqs > 1000) & (freqs < 1450)].sum()
        high = power[(freqs > 1750) & (freqs < 2600)].sum()
        log_ratio["mood/theme---deep" in track.tags].append(np.log10(low / high))
    assert log_ratio[True] and log_ratio[False]
    assert min(log_ratio[True]) > 0 > max(log_ratio[False])


@pytest.mark.parametrize("fast, bpm_range", [(True, (150, 180)), (False, (70, 110))])
def test_tempo_rule_of_the_percussion_layer(fast, bpm_range):
    num_samples = 10 * synthetic.SAMPLE_RATE
    layer = synthetic.percussion(num_samples, fast, np.random.default_rng(0))
    hop = 441  # 10 ms frames
    envelope = np.abs(layer[: num_samples // hop * hop]).reshape(-1, hop).max(axis=1)
    onsets = np.flatnonzero((envelope[1:] > 0.1) & (envelope[:-1] <= 0.1))
    bpm = 60 / (np.median(np.diff(onsets)) * hop / synthetic.SAMPLE_RATE)
    assert bpm_range[0] - 3 <= bpm <= bpm_range[1] + 3


def test_same_seed_same_bytes_via_cli_with_two_workers(tmp_path):
    arguments = dict(num_tracks=12, seed=5, duration=2.0, long_tracks=0)
    synthetic.make_synthetic(tmp_path / "in_process", workers=1, **arguments)
    command = [
        sys.executable,
        "-m",
        "data_prep.synthetic",
        "--out",
        str(tmp_path / "cli"),
        "--tracks",
        "12",
        "--seed",
        "5",
        "--duration",
        "2",
        "--long_tracks",
        "0",
        "--workers",
        "2",
    ]
    subprocess.run(command, check=True, cwd=PROJECT_ROOT, timeout=120)
    assert file_digests(tmp_path / "cli") == file_digests(tmp_path / "in_process")
    synthetic.make_synthetic(tmp_path / "other_seed", workers=1, **{**arguments, "seed": 6})
    other = file_digests(tmp_path / "other_seed")
    assert other.keys() != file_digests(tmp_path / "cli").keys()  # other track ids
    tsv = "data/autotagging_moodtheme.tsv"
    assert (tmp_path / "other_seed" / tsv).read_bytes() != (tmp_path / "cli" / tsv).read_bytes()


def test_refuses_to_overwrite_and_too_few_tracks(tree, tmp_path):
    with pytest.raises(FileExistsError, match="audio already exists"):
        synthetic.make_synthetic(tree, num_tracks=10)
    with pytest.raises(ValueError, match="num_tracks must be at least 10"):
        synthetic.make_synthetic(tmp_path / "small", num_tracks=5)


@pytest.mark.skipif(not REAL_METADATA.is_dir(), reason=f"real MTG-Jamendo metadata not found at {REAL_METADATA}")
def test_tags_are_real_mtg_jamendo_names():
    real_all = set((REAL_METADATA / "tags" / "moodtheme.txt").read_text().split())
    real_split = metadata.read_tag_list(REAL_METADATA)
    assert set(synthetic.LABEL_TAGS) <= set(real_split)
    assert synthetic.DROPPED_TAG in real_all - set(real_split)
    assert list(synthetic.LABEL_TAGS) == sorted(synthetic.LABEL_TAGS)  # the real list is alphabetical


def test_track_lengths_have_the_real_shape_around_their_median():
    durations = np.array([plan.duration for plan in synthetic.plan_tracks(3000, seed=0, duration=205.7)])
    assert np.median(durations) == pytest.approx(205.7, rel=0.05)
    assert np.log(durations).std() == pytest.approx(0.597, abs=0.03)  # the real split-0 training spread
    assert durations.min() >= 30.0 and durations.max() <= 2645.0
    short = np.array([plan.duration for plan in synthetic.plan_tracks(200, seed=0, duration=6.0)])
    assert short.min() >= synthetic.MIN_DURATION and short.max() > 2 * np.median(short)


@pytest.mark.parametrize("subset", ["genre", "instrument", "top50tags"])
def test_another_subsets_tree_plants_the_same_sounds_under_that_subsets_real_names(tree, tmp_path, subset):
    synthetic.make_synthetic(
        tmp_path, num_tracks=20, seed=3, duration=2.0, long_tracks=1, subset=subset, with_audio=False
    )
    data = tmp_path / "data"
    assert not (tmp_path / "audio").exists() and metadata.full_tsv_path(data, subset).is_file()
    names = synthetic.SUBSET_TAGS[subset]
    for part in metadata.SPLIT_PARTS:
        moodtheme = metadata.read_split(tree / "data", 0, part)
        renamed = metadata.read_split(data, 0, part, subset)
        assert [track.track_id for track in renamed] == [track.track_id for track in moodtheme]
        assert [track.tags for track in renamed] == [
            tuple(names[metadata.short_tag_name(tag)] for tag in track.tags) for track in moodtheme
        ]
    tag_list = metadata.read_tag_list(data, subset)
    assert set(tag_list) <= set(synthetic.label_tags(subset)) and list(tag_list) == sorted(tag_list)
    assert (metadata.tag_list_path(data, subset) is None) == (subset != "top50tags")
    if REAL_METADATA.is_dir():
        real = set(metadata.read_tag_list(REAL_METADATA, subset))
        assert set(synthetic.label_tags(subset)) <= real
        real_or_mood = real | set(metadata.read_tag_list(REAL_METADATA))  # top-50's left-out tag is a mood
        assert names[synthetic.DROPPED_NAME] in real_or_mood - set(synthetic.label_tags(subset))
