"""Readers for the MTG-Jamendo metadata of its four auto-tagging subsets (their formats: README, "Data preparation").

A metadata directory is laid out as the dataset's ``data/`` folder, for each subset (``SUBSETS``)::

    autotagging_moodtheme.tsv                                  every track of the subset (59 tags)
    splits/split-K/autotagging_moodtheme-{train,validation,test}.tsv
    tags/moodtheme_split.txt                                   the 56 tags, in the official column order

The label columns of a subset (`read_tag_list`) are its published list where MTG-Jamendo has one for the split's
tags (``tags/moodtheme_split.txt``, ``tags/top50.txt``); genre and instrument have none, so theirs are the tags of
the split's three TSVs in alphabetical order, the order of both published lists and of the dataset paper's result
tables. A user's own collection is written in the same layout by ``data_prep.collection`` (subset ``collection``,
whose ids, paths and tag names are the user's).

The TSVs end lines with CRLF and hold a VARIABLE number of tag columns after the five fixed ones, so a
fixed-column reader breaks on them. Every problem is a ``MetadataError`` that names the file and line, so
that a bad row in an 18,000-line file can be found at once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

TSV_HEADER: tuple[str, ...] = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS")
SUBSETS: tuple[str, ...] = ("moodtheme", "genre", "instrument", "top50tags")
DEFAULT_SUBSET = "moodtheme"
COLLECTION = "collection"
# The published lists that fix the label columns; a subset without one takes its split's tags (see the docstring).
_TAG_LIST_FILES = {"moodtheme": "moodtheme_split.txt", "top50tags": "top50.txt", COLLECTION: "collection.txt"}
FULL_TSV_NAME = "autotagging_moodtheme.tsv"
TAG_LIST_NAME = os.path.join("tags", _TAG_LIST_FILES[DEFAULT_SUBSET])
SPLIT_PARTS: tuple[str, ...] = ("train", "validation", "test")
TAG_SEPARATOR = "---"  # a tag is "<category>---<name>", e.g. "mood/theme---calm"

_HEADER_LINE = "\t".join(TSV_HEADER)
_FIXED_COLUMNS = len(TSV_HEADER) - 1  # the TAGS header names the first of a variable number of columns
_ID_PATTERNS = {
    "TRACK_ID": re.compile(r"track_\d+"),
    "ARTIST_ID": re.compile(r"artist_\d+"),
    "ALBUM_ID": re.compile(r"album_\d+"),
}
_DURATION_PATTERN = re.compile(r"\d+(\.\d+)?")

PathLike = str | os.PathLike


class MetadataError(ValueError):
    """Malformed metadata; the message starts with ``file:line``."""


@dataclasses.dataclass(frozen=True)
class Track:
    """One row of a metadata TSV."""

    track_id: str  # "track_0000948"
    artist_id: str  # "artist_000087"
    album_id: str  # "album_000149"
    path: str  # "48/948.mp3", relative to the audio root
    duration: float  # seconds, from the TSV
    tags: tuple[str, ...]  # full names as in the TSV, e.g. "mood/theme---calm"
    line: int  # 1-based line number in its TSV, for error messages
    source: str = ""  # the TSV it came from, for error messages

    @property
    def location(self) -> str:
        """``file:line`` of this row, the prefix of every error about it."""
        return f"{self.source}:{self.line}"


def audio_path_for(track_id: str) -> str:
    """The dataset's relative MP3 path of a track: ``track_0000948`` -> ``48/948.mp3``."""
    if not _ID_PATTERNS["TRACK_ID"].fullmatch(track_id):
        raise ValueError(f"not a track id: {track_id!r} (expected like 'track_0000948')")
    number = int(track_id.removeprefix("track_"))
    return f"{number % 100:02d}/{number}.mp3"


def check_subset(subset: str) -> str:
    """``subset``, or ValueError listing the valid names."""
    if subset not in (*SUBSETS, COLLECTION):
        raise ValueError(f"unknown subset {subset!r}; expected one of {SUBSETS}")
    return subset


def full_tsv_path(metadata_dir: PathLike, subset: str = DEFAULT_SUBSET) -> Path:
    """The TSV that lists every track of the subset."""
    return Path(metadata_dir) / f"autotagging_{check_subset(subset)}.tsv"


def split_tsv_path(metadata_dir: PathLike, split_index: int, part: str, subset: str = DEFAULT_SUBSET) -> Path:
    """The TSV of one part (train/validation/test) of split ``split_index`` of a subset."""
    if part not in SPLIT_PARTS:
        raise ValueError(f"unknown split part {part!r}; expected one of {SPLIT_PARTS}")
    if not isinstance(split_index, int) or split_index < 0:
        raise ValueError(f"split_index must be a non-negative int, got {split_index!r}")
    return Path(metadata_dir) / "splits" / f"split-{split_index}" / f"autotagging_{check_subset(subset)}-{part}.tsv"


def tag_list_path(metadata_dir: PathLike, subset: str = DEFAULT_SUBSET) -> Path | None:
    """The published file that fixes the subset's label columns; None for a subset without one (genre,
    instrument), whose columns are its split's tags."""
    name = _TAG_LIST_FILES.get(check_subset(subset))
    return None if name is None else Path(metadata_dir) / "tags" / name


def _holds_split(directory: Path, split_index: int, subset: str) -> bool:
    tag_list = tag_list_path(directory, subset)
    return (tag_list is None or tag_list.is_file()) and all(
        split_tsv_path(directory, split_index, part, subset).is_file() for part in SPLIT_PARTS
    )


def check_metadata_dir(metadata_dir: PathLike, split_index: int, subset: str = DEFAULT_SUBSET) -> None:
    """MetadataError unless ``metadata_dir`` holds the subset's tag list and the TSVs of the split; when they lie one
    level down (the dataset's repository root given) or up to two levels up (its ``splits/`` or ``tags/`` given),
    the message names the folder to give instead."""
    metadata_dir = Path(metadata_dir)
    if _holds_split(metadata_dir, split_index, subset):
        return
    below = sorted(child for child in metadata_dir.glob("*") if child.is_dir()) if metadata_dir.is_dir() else []
    above = metadata_dir.absolute().parents[:2]
    candidates = [folder for folder in (*below, *above) if _holds_split(folder, split_index, subset)]
    tag_list = tag_list_path("", subset)
    tsvs = (
        f"splits/split-{split_index}/*.tsv"
        if subset == DEFAULT_SUBSET
        else f"splits/split-{split_index}/autotagging_{subset}-*.tsv"
    )
    wanted = f"{tag_list} and {tsvs}" if tag_list else tsvs
    if candidates:
        advice = f"give --metadata_dir {candidates[0]} instead, which has them"
    else:
        advice = "give the MTG-Jamendo repository's data/ folder, which has them"
    state = "does not exist" if not metadata_dir.exists() else f"holds no {wanted}"
    raise MetadataError(f"{metadata_dir} {state}; {advice}")


def _lines(path: Path) -> list[str]:
    """Lines without their CRLF or LF end; a final line end does not open an empty last line."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def short_tag_name(tag: str) -> str:
    """The name of a tag without its category ("mood/theme---calm" -> "calm"), for tables and plots."""
    return tag.rpartition(TAG_SEPARATOR)[2]


def _parse_tag(tag: str, where: str, collection: bool = False) -> str:
    category, separator, name = tag.partition(TAG_SEPARATOR)
    if not (collection or (category and separator and name)) or not tag or tag != tag.strip():
        raise MetadataError(f"{where}: malformed tag {tag!r} (expected like 'mood/theme---calm')")
    return tag


def _parse_row(line: str, where: str, line_number: int, source: str, collection: bool = False) -> Track:
    columns = line.split("\t")
    if len(columns) <= _FIXED_COLUMNS:
        raise MetadataError(
            f"{where}: expected {_FIXED_COLUMNS} tab-separated fields and at least one tag, "
            f"got {len(columns)} field(s): {line!r}"
        )
    track_id, artist_id, album_id, path, duration_text = columns[:_FIXED_COLUMNS]
    for name, value in zip(TSV_HEADER, columns[: 1 if collection else 3]):
        if not _ID_PATTERNS[name].fullmatch(value):
            raise MetadataError(f"{where}: malformed {name} {value!r}")
    if collection and not path:
        raise MetadataError(f"{where}: empty PATH")
    if not collection and path != audio_path_for(track_id):
        raise MetadataError(
            f"{where}: PATH {path!r} does not belong to {track_id} (expected {audio_path_for(track_id)!r})"
        )
    if not _DURATION_PATTERN.fullmatch(duration_text):
        raise MetadataError(f"{where}: malformed DURATION {duration_text!r} (expected seconds like '212.7')")
    tags = tuple(_parse_tag(tag, where, collection) for tag in columns[_FIXED_COLUMNS:])
    if len(set(tags)) != len(tags):
        raise MetadataError(f"{where}: a tag is listed twice in {tags}")
    return Track(track_id, artist_id, album_id, path, float(duration_text), tags, line_number, source)


def read_tracks(tsv_path: PathLike, collection: bool = False) -> list[Track]:
    """All rows of a metadata TSV, in file order; any malformed line raises ``MetadataError``. A ``collection``'s
    TSV (`data_prep.collection`) may hold any artist, album, path and tag names."""
    tsv_path = Path(tsv_path)
    lines = _lines(tsv_path)
    if not lines or tuple(lines[0].split("\t")) != TSV_HEADER:
        header = lines[0] if lines else ""
        raise MetadataError(f"{tsv_path}:1: expected the header {_HEADER_LINE!r}, got {header!r}")
    tracks = []
    first_line_of = {}
    for line_number, line in enumerate(lines[1:], start=2):
        where = f"{tsv_path}:{line_number}"
        track = _parse_row(line, where, line_number, str(tsv_path), collection)
        if track.track_id in first_line_of:
            raise MetadataError(
                f"{where}: {track.track_id} is listed again (first on line {first_line_of[track.track_id]})"
            )
        first_line_of[track.track_id] = line_number
        tracks.append(track)
    return tracks


def write_lines(path: PathLike, lines: Iterable[str], newline: str = "\n") -> None:
    """A UTF-8 text file of `lines`, each ended by `newline`, written whole or not at all (a temporary file renamed
    into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    os.replace(temporary, path)


def write_tracks(tsv_path: PathLike, tracks: Iterable[Track]) -> None:
    """A metadata TSV in the dataset's format: the header, then one CRLF-ended row per track with its variable tag
    columns."""
    rows = (
        "\t".join((track.track_id, track.artist_id, track.album_id, track.path, f"{track.duration:.1f}", *track.tags))
        for track in tracks
    )
    write_lines(tsv_path, [_HEADER_LINE, *rows], "\r\n")


def write_tag_list(path: PathLike, tags: Iterable[str]) -> None:
    """A tag list in the dataset's format: one tag per LF-ended line, in column order."""
    write_lines(path, tags)


def read_tag_list(metadata_dir: PathLike, subset: str = DEFAULT_SUBSET, split_index: int = 0) -> tuple[str, ...]:
    """The label columns of a subset: its published list, in that list's order (for mood/theme the official
    ``tags/moodtheme_split.txt``), or where there is none every tag of the split's TSVs, alphabetically."""
    path = tag_list_path(metadata_dir, subset)
    if path is None:
        return tuple(
            sorted(
                {
                    tag
                    for part in SPLIT_PARTS
                    for track in read_tracks(split_tsv_path(metadata_dir, split_index, part, subset))
                    for tag in track.tags
                }
            )
        )
    tags = []
    for line_number, line in enumerate(_lines(path), start=1):
        where = f"{path}:{line_number}"
        tag = _parse_tag(line, where, subset == COLLECTION)
        if tag in tags:
            raise MetadataError(f"{where}: tag {tag!r} is listed twice")
        tags.append(tag)
    if not tags:
        raise MetadataError(f"{path}: lists no tags")
    return tuple(tags)


def multi_hot(tags: Iterable[str], tag_list: Sequence[str], where: str = "") -> np.ndarray:
    """Bool vector of ``len(tag_list)`` with the columns of ``tags`` set.

    ``where`` (``file:line``) prefixes the error for a tag outside ``tag_list``.
    """
    column_of = {tag: column for column, tag in enumerate(tag_list)}
    labels = np.zeros(len(tag_list), dtype=bool)
    for tag in tags:
        if tag not in column_of:
            prefix = f"{where}: " if where else ""
            raise MetadataError(f"{prefix}unknown tag {tag!r} (not among the {len(tag_list)} tags of the tag list)")
        labels[column_of[tag]] = True
    return labels


def track_labels(track: Track, tag_list: Sequence[str]) -> np.ndarray:
    """``multi_hot`` of a track's tags; an unknown tag names the track's file and line."""
    return multi_hot(track.tags, tag_list, where=track.location)


def read_split(
    metadata_dir: PathLike, split_index: int, part: str, subset: str = DEFAULT_SUBSET, tag_list: Sequence[str] = ()
) -> list[Track]:
    """Rows of one split part, each checked against the tag list (unknown tag -> file:line error); ``tag_list``
    (default: `read_tag_list`) saves reading it again."""
    tag_list = tag_list or read_tag_list(metadata_dir, subset, split_index)
    tracks = read_tracks(split_tsv_path(metadata_dir, split_index, part, subset), subset == COLLECTION)
    for track in tracks:
        track_labels(track, tag_list)
    return tracks


def split_labels(metadata_dir: PathLike, split_index: int, part: str, subset: str = DEFAULT_SUBSET) -> np.ndarray:
    """(tracks, tags) bool labels of one part of a split, rows in its TSV's order, columns in the tag list's."""
    tag_list = read_tag_list(metadata_dir, subset, split_index)
    tracks = read_split(metadata_dir, split_index, part, subset, tag_list)
    return np.array([track_labels(track, tag_list) for track in tracks], dtype=bool).reshape(len(tracks), len(tag_list))
