"""Readers for the MTG-Jamendo mood/theme metadata (its formats: README, "Data preparation").

A metadata directory is laid out as the dataset's ``data/`` folder::

    autotagging_moodtheme.tsv                                  every track of the subset (59 tags)
    splits/split-K/autotagging_moodtheme-{train,validation,test}.tsv
    tags/moodtheme_split.txt                                   the 56 tags, in the official column order

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
FULL_TSV_NAME = "autotagging_moodtheme.tsv"
TAG_LIST_NAME = os.path.join("tags", "moodtheme_split.txt")
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


def full_tsv_path(metadata_dir: PathLike) -> Path:
    """The TSV that lists every track of the subset."""
    return Path(metadata_dir) / FULL_TSV_NAME


def split_tsv_path(metadata_dir: PathLike, split_index: int, part: str) -> Path:
    """The TSV of one part (train/validation/test) of split ``split_index``."""
    if part not in SPLIT_PARTS:
        raise ValueError(f"unknown split part {part!r}; expected one of {SPLIT_PARTS}")
    if not isinstance(split_index, int) or split_index < 0:
        raise ValueError(f"split_index must be a non-negative int, got {split_index!r}")
    return Path(metadata_dir) / "splits" / f"split-{split_index}" / f"autotagging_moodtheme-{part}.tsv"


def tag_list_path(metadata_dir: PathLike) -> Path:
    """The file that fixes the label columns."""
    return Path(metadata_dir) / TAG_LIST_NAME


def _holds_split(directory: Path, split_index: int) -> bool:
    return tag_list_path(directory).is_file() and all(
        split_tsv_path(directory, split_index, part).is_file() for part in SPLIT_PARTS
    )


def check_metadata_dir(metadata_dir: PathLike, split_index: int) -> None:
    """MetadataError unless ``metadata_dir`` holds the tag list and the TSVs of the split; when they lie one level
    down (the dataset's repository root given) or up to two levels up (its ``splits/`` or ``tags/`` given), the
    message names the folder to give instead."""
    metadata_dir = Path(metadata_dir)
    if _holds_split(metadata_dir, split_index):
        return
    below = sorted(child for child in metadata_dir.glob("*") if child.is_dir()) if metadata_dir.is_dir() else []
    above = metadata_dir.absolute().parents[:2]
    candidates = [folder for folder in (*below, *above) if _holds_split(folder, split_index)]
    wanted = f"{TAG_LIST_NAME} and splits/split-{split_index}/*.tsv"
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


def _parse_tag(tag: str, where: str) -> str:
    category, separator, name = tag.partition(TAG_SEPARATOR)
    if not (category and separator and name) or tag != tag.strip():
        raise MetadataError(f"{where}: malformed tag {tag!r} (expected like 'mood/theme---calm')")
    return tag


def _parse_row(line: str, where: str, line_number: int, source: str) -> Track:
    columns = line.split("\t")
    if len(columns) <= _FIXED_COLUMNS:
        raise MetadataError(
            f"{where}: expected {_FIXED_COLUMNS} tab-separated fields and at least one tag, "
            f"got {len(columns)} field(s): {line!r}"
        )
    track_id, artist_id, album_id, path, duration_text = columns[:_FIXED_COLUMNS]
    for name, value in zip(TSV_HEADER, columns[:3]):
        if not _ID_PATTERNS[name].fullmatch(value):
            raise MetadataError(f"{where}: malformed {name} {value!r}")
    if path != audio_path_for(track_id):
        raise MetadataError(
            f"{where}: PATH {path!r} does not belong to {track_id} (expected {audio_path_for(track_id)!r})"
        )
    if not _DURATION_PATTERN.fullmatch(duration_text):
        raise MetadataError(f"{where}: malformed DURATION {duration_text!r} (expected seconds like '212.7')")
    tags = tuple(_parse_tag(tag, where) for tag in columns[_FIXED_COLUMNS:])
    if len(set(tags)) != len(tags):
        raise MetadataError(f"{where}: a tag is listed twice in {tags}")
    return Track(track_id, artist_id, album_id, path, float(duration_text), tags, line_number, source)


def read_tracks(tsv_path: PathLike) -> list[Track]:
    """All rows of a metadata TSV, in file order; any malformed line raises ``MetadataError``."""
    tsv_path = Path(tsv_path)
    lines = _lines(tsv_path)
    if not lines or tuple(lines[0].split("\t")) != TSV_HEADER:
        header = lines[0] if lines else ""
        raise MetadataError(f"{tsv_path}:1: expected the header {_HEADER_LINE!r}, got {header!r}")
    tracks = []
    first_line_of = {}
    for line_number, line in enumerate(lines[1:], start=2):
        where = f"{tsv_path}:{line_number}"
        track = _parse_row(line, where, line_number, str(tsv_path))
        if track.track_id in first_line_of:
            raise MetadataError(
                f"{where}: {track.track_id} is listed again (first on line {first_line_of[track.track_id]})"
            )
        first_line_of[track.track_id] = line_number
        tracks.append(track)
    return tracks


def read_tag_list(metadata_dir: PathLike) -> tuple[str, ...]:
    """The label columns, in the official order of ``tags/moodtheme_split.txt``."""
    path = tag_list_path(metadata_dir)
    tags = []
    for line_number, line in enumerate(_lines(path), start=1):
        where = f"{path}:{line_number}"
        tag = _parse_tag(line, where)
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


def read_split(metadata_dir: PathLike, split_index: int, part: str) -> list[Track]:
    """Rows of one split part, each checked against the tag list (unknown tag -> file:line error)."""
    tag_list = read_tag_list(metadata_dir)
    tracks = read_tracks(split_tsv_path(metadata_dir, split_index, part))
    for track in tracks:
        track_labels(track, tag_list)
    return tracks


def split_labels(metadata_dir: PathLike, split_index: int, part: str) -> np.ndarray:
    """(tracks, tags) bool labels of one part of a split, rows in its TSV's order, columns in the tag list's."""
    tag_list = read_tag_list(metadata_dir)
    tracks = read_tracks(split_tsv_path(metadata_dir, split_index, part))
    return np.array([track_labels(track, tag_list) for track in tracks], dtype=bool)
