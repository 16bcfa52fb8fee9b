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


ML4MD2019_RESULTS = reference_data.ROOT / "mtg-jamendo" / "results" / "ml4md2019"
# The dataset paper's top-50 baseline table names 4 tags of an earlier top-50 list in place of 4 of tags/top50.txt.
EARLIER_TOP50 = {"genre---electropop", "genre---progressive", "instrument---sampler", "mood/theme---dark"}
LATER_TOP50 = {"genre---funk", "instrument---electricpiano", "instrument---strings", "mood/theme---emotional"}


@needs_real_metadata
@pytest.mark.parametrize(
    "subset, results, tag_count, tracks, first, last",
    [
        ("moodtheme", "mood", 56, (9949, 3802, 4231), "mood/theme---action", "mood/theme---uplifting"),
        ("genre", "genre", 87, (32572, 11043, 11479), "genre---60s", "genre---worldfusion"),
        ("instrument", "instrument", 40, (14395, 5466, 5115), "instrument---accordion", "instrument---voice"),
        ("top50tags", "top50", 50, (32136, 10888, 11356), "genre---alternative", "mood/theme---relaxing"),
    ],
)
def test_every_subsets_real_split_0_has_its_tags_in_alphabetical_order(subset, results, tag_count, tracks, first, last):
    tag_list = metadata.read_tag_list(REAL_METADATA, subset)
    assert len(tag_list) == tag_count and (tag_list[0], tag_list[-1]) == (first, last)
    parts = {part: metadata.read_split(REAL_METADATA, 0, part, subset, tag_list) for part in metadata.SPLIT_PARTS}
    assert tuple(len(part) for part in parts.values()) == tracks
    # The rule: a published list where there is one (moodtheme, top-50) is the split's tags alphabetically, which is
    # what genre and instrument, without one, get.
    assert list(tag_list) == sorted({tag for part in parts.values() for track in part for tag in track.tags})
    artists = [{track.artist_id for track in part} for part in parts.values()]
    assert not (artists[0] & artists[1] or artists[0] & artists[2] or artists[1] & artists[2])
    if not ML4MD2019_RESULTS.is_dir():
        return
    published = [line.split("\t")[0] for line in (ML4MD2019_RESULTS / f"auc_{results}.tsv").read_text().splitlines()]
    assert published[0] == "tag" and published[1:] == sorted(published[1:])
    if subset == "top50tags":
        assert set(published[1:]) ^ set(tag_list) == EARLIER_TOP50 | LATER_TOP50
    else:
        assert published[1:] == list(tag_list)


def test_other_subsets_are_read_by_their_own_file_names_and_a_collection_by_any_names(tmp_path):
    genre_row = "track_0000950\tartist_000087\talbum_000149\t50/950.mp3\t248.0\tgenre---rock\tgenre---pop"
    for part in metadata.SPLIT_PARTS:
        write_tsv(metadata.split_tsv_path(tmp_path, 0, part, "genre"), [genre_row])
    assert metadata.split_tsv_path(tmp_path, 0, "test", "genre").name == "autotagging_genre-test.tsv"
    assert metadata.tag_list_path(tmp_path, "genre") is None
    assert metadata.read_tag_list(tmp_path, "genre") == ("genre---pop", "genre---rock")
    metadata.check_metadata_dir(tmp_path, 0, "genre")
    with pytest.raises(metadata.MetadataError, match=r"holds no tags/top50.txt and splits/split-0/autotagging_top50"):
        metadata.check_metadata_dir(tmp_path, 0, "top50tags")
    with pytest.raises(ValueError, match="unknown subset 'genres'"):
        metadata.split_tsv_path(tmp_path, 0, "train", "genres")

    collection_row = "track_0000000000000000007\tThe Band\t\trock/one, two.mp3\t3.5\tHappy Days\tsad"
    path = write_tsv(tmp_path / "collection.tsv", [collection_row])
    (track,) = metadata.read_tracks(path, collection=True)
    assert (track.artist_id, track.album_id, track.path, track.tags) == (
        "The Band",
        "",
        "rock/one, two.mp3",
        ("Happy Days", "sad"),
    )
    with pytest.raises(metadata.MetadataError, match="malformed ARTIST_ID"):
        metadata.read_tracks(path)  # MTG-Jamendo's own TSVs keep their checks
    metadata.write_tracks(tmp_path / "again.tsv", [track])
    assert (tmp_path / "again.tsv").read_bytes() == path.read_bytes()


@pytest.mark.skipif(not ML4MD2019_RESULTS.is_dir(), reason=f"published baselines not found at {ML4MD2019_RESULTS}")
def test_the_results_page_gives_each_subsets_published_baseline_as_its_files_average_it():
    page = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text(encoding="utf-8")
    for subset, results in (
        ("moodtheme", "mood"),
        ("genre", "genre"),
        ("instrument", "instrument"),
        ("top50tags", "top50"),
    ):
        rows = [line.split("\t") for line in (ML4MD2019_RESULTS / f"auc_{results}.tsv").read_text().splitlines()[1:]]
        roc_auc, pr_auc = (np.mean([float(row[column]) for row in rows]) for column in (1, 2))
        row = next(line for line in page.splitlines() if f"(`{subset}`) |" in line)
        assert f"| {len(rows)} |" in row and f"| {roc_auc:.4f} | {pr_auc:.4f} |" in row, row
