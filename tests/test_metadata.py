"""MTG-Jamendo metadata readers: the real files (benchmarks/reference_data.py), and small hand-written TSVs."""

from pathlib import Path

import numpy as np
import pytest

from benchmarks import reference_data
from data_prep import metadata

REAL_METADATA = reference_data.MTG_JAMENDO_METADATA
needs_real_metadata = pytest.mark.skipif(
    not REAL_METADATA.is_dir(), reason=f"real MTG-Jamendo metadata not found at {REAL_METADATA}"
)

HEADER = "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS"
CALM, DARK, EPIC = "mood/theme---calm", "mood/theme---dark", "mood/theme---epic"


def write_tsv(path: Path, rows: list[str], newline: str = "\r\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in [HEADER, *rows]).encode())
    return path


def write_metadata_dir(root: Path, train_rows: list[str], tags: tuple[str, ...] = (CALM, DARK)) -> Path:
    (root / "tags").mkdir(parents=True)
    (root / "tags" / "moodtheme_split.txt").write_text("".join(tag + "\n" for tag in tags))
    write_tsv(metadata.split_tsv_path(root, 0, "train"), train_rows)
    return root


@needs_real_metadata
def test_real_full_tsv_has_18486_tracks_and_59_tags():
    tracks = metadata.read_tracks(metadata.full_tsv_path(REAL_METADATA))
    assert len(tracks) == 18486
    assert len({tag for track in tracks for tag in track.tags}) == 59
    assert tracks[0] == metadata.Track(
        "track_0000948",
        "artist_000087",
        "album_000149",
        "48/948.mp3",
        212.7,
        ("mood/theme---background",),
        2,
        str(metadata.full_tsv_path(REAL_METADATA)),
    )
    assert max(len(track.tags) for track in tracks) == 8  # rows of 13 columns


@needs_real_metadata
def test_real_split_0_sizes_tags_and_artist_disjointness():
    tag_list = metadata.read_tag_list(REAL_METADATA)
    assert len(tag_list) == 56 and tag_list[0] == "mood/theme---action" and tag_list[-1] == "mood/theme---uplifting"
    parts = {part: metadata.read_split(REAL_METADATA, 0, part) for part in metadata.SPLIT_PARTS}
    assert {part: len(tracks) for part, tracks in parts.items()} == {"train": 9949, "validation": 3802, "test": 4231}
    for tracks in parts.values():
        assert {tag for track in tracks for tag in track.tags} == set(tag_list)
    artists = {part: {track.artist_id for track in tracks} for part, tracks in parts.items()}
    assert not artists["train"] & artists["validation"]
    assert not artists["train"] & artists["test"]
    assert not artists["validation"] & artists["test"]
    labels = np.stack([metadata.track_labels(track, tag_list) for track in parts["test"]])
    assert labels.shape == (4231, 56) and labels.sum() == 7564  # the official test ground truth has 7,564 positives


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_variable_tag_columns_and_line_ends(tmp_path, newline):
    path = write_tsv(
        tmp_path / "t.tsv",
        [
            f"track_0000948\tartist_000087\talbum_000149\t48/948.mp3\t212.7\t{CALM}",
            f"track_0001007\tartist_000001\talbum_000002\t07/1007.mp3\t30.0\t{CALM}\t{DARK}\t{EPIC}",
        ],
        newline,
    )
    first, second = metadata.read_tracks(path)
    assert first.tags == (CALM,)
    assert second.tags == (CALM, DARK, EPIC)
    assert (second.path, second.duration, second.line) == ("07/1007.mp3", 30.0, 3)
    assert second.location == f"{path}:3"


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ("track_0000948\tartist_000087\talbum_000149\t48/948.mp3\t212.7", "at least one tag"),
        ("track_0000948\tartist_000087\talbum_000149\t48/948.mp3\tlong\tmood/theme---calm", "DURATION"),
        ("track_0000948\tartist_000087\talbum_000149\t49/948.mp3\t212.7\tmood/theme---calm", "PATH"),
        ("track_0000948\talbum_000149\tartist_000087\t48/948.mp3\t212.7\tmood/theme---calm", "ARTIST_ID"),
        ("track_0000948\tartist_000087\talbum_000149\t48/948.mp3\t212.7\tcalm", "malformed tag"),
        ("track_0000948\tartist_000087\talbum_000149\t48/948.mp3\t212.7\tmood/theme---calm\t", "malformed tag"),
        ("", "at least one tag"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad_row, message):
    good = f"track_0000950\tartist_000087\talbum_000149\t50/950.mp3\t248.0\t{CALM}"
    path = write_tsv(tmp_path / "bad.tsv", [good, bad_row])
    with pytest.raises(metadata.MetadataError, match=message) as error:
        metadata.read_tracks(path)
    assert str(error.value).startswith(f"{path}:3: ")


def test_wrong_header_and_repeated_track_are_errors(tmp_path):
    path = tmp_path / "header.tsv"
    path.write_bytes(b"TRACK_ID\tPATH\r\n")
    with pytest.raises(metadata.MetadataError, match=f"{path}:1: expected the header"):
        metadata.read_tracks(path)
    row = f"track_0000950\tartist_000087\talbum_000149\t50/950.mp3\t248.0\t{CALM}"
    path = write_tsv(tmp_path / "twice.tsv", [row, row])
    with pytest.raises(metadata.MetadataError, match=f"{path}:3: track_0000950 is listed again"):
        metadata.read_tracks(path)


def test_unknown_tag_in_split_names_file_and_line(tmp_path):
    rows = [
        f"track_0000950\tartist_000087\talbum_000149\t50/950.mp3\t248.0\t{CALM}",
        f"track_0000951\tartist_000087\talbum_000149\t51/951.mp3\t199.7\t{DARK}\t{EPIC}",
    ]
    root = write_metadata_dir(tmp_path / "data", rows)
    split_file = metadata.split_tsv_path(root, 0, "train")
    with pytest.raises(metadata.MetadataError, match="unknown tag 'mood/theme---epic'") as error:
        metadata.read_split(root, 0, "train")
    assert str(error.value).startswith(f"{split_file}:3: ")


def test_read_split_and_multi_hot_follow_the_tag_list_order(tmp_path):
    rows = [f"track_0000950\tartist_000087\talbum_000149\t50/950.mp3\t248.0\t{EPIC}\t{CALM}"]
    root = write_metadata_dir(tmp_path / "data", rows, tags=(EPIC, DARK, CALM))
    (track,) = metadata.read_split(root, 0, "train")
    labels = metadata.track_labels(track, metadata.read_tag_list(root))
    assert labels.dtype == bool
    assert labels.tolist() == [True, False, True]
    assert metadata.multi_hot([], (CALM,)).tolist() == [False]
    with pytest.raises(metadata.MetadataError, match="^somewhere:7: unknown tag 'mood/theme---dark'"):
        metadata.multi_hot([DARK], (CALM,), where="somewhere:7")


def test_tag_list_errors_and_split_arguments(tmp_path):
    (tmp_path / "tags").mkdir()
    (tmp_path / "tags" / "moodtheme_split.txt").write_text(f"{CALM}\n{DARK}\n{CALM}\n")
    with pytest.raises(metadata.MetadataError, match=r"moodtheme_split.txt:3: tag 'mood/theme---calm' is listed twice"):
        metadata.read_tag_list(tmp_path)
    with pytest.raises(ValueError, match="unknown split part 'valid'"):
        metadata.split_tsv_path(tmp_path, 0, "valid")
    with pytest.raises(ValueError, match="split_index"):
        metadata.split_tsv_path(tmp_path, -1, "train")
    assert metadata.audio_path_for("track_0000007") == "07/7.mp3"
