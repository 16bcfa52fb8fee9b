"""A user's own labelled collection: a CSV (or TSV) of audio files and their tags, checked, split and written in
MTG-Jamendo's metadata layout, so that the build, training, evaluation and tagging treat it as one more subset.

The file has a header naming its columns, then one row per audio file::

    path,tags,split,artist
    albums/one/01.mp3,happy;summer,train,Band A

``path`` (relative to the audio folder) and ``tags`` (separated by ``;``) are required; ``split`` (train, validation
or test) and ``artist`` are optional, in any order. A header with a tab in it makes the file a TSV. Every problem
is a ``CollectionError`` that names the file and line: an empty file, a missing or unknown column, a row without a
path or without tags, an absolute path, a path listed twice, an unknown split value.

Without a ``split`` column, `make_split` splits the rows reproducibly (a seed; 80/10/10 % by default): all tracks of
an artist in one part, and each tag spread over the parts in the parts' proportions as far as the artists allow
(iterative stratification, rarest tag first, a part without the tag served first). A tag with fewer than
``min_tag_tracks`` tracks in a part can be neither learnt nor scored there: it is reported with its counts and left
out (``keep_rare_tags`` keeps it), and a track left without a tag is left out of the split, as MTG-Jamendo leaves out
the tracks of its dropped tags.

`write_metadata` writes ``DATA_DIR/collection/`` in MTG-Jamendo's layout (subset ``collection``)::

    autotagging_collection.tsv                                    every row of the file, with all its tags
    splits/split-K/autotagging_collection-{train,validation,test}.tsv  the split, with the kept tags
    splits/split-K/test_groundtruth.npy                           the test TSV's labels, for emorf_jax.evaluate
    tags/collection.txt                                           the kept tags, the label columns: alphabetical
    tag_counts.tsv                                                every tag's tracks per part, and whether it is kept

A track's id is ``track_`` and 19 digits of the SHA-256 of its path, so that a path keeps its id, and its cached
features, when rows are added or reordered; ARTIST_ID is the artist column's text, ALBUM_ID empty, DURATION the
length the file's header gives (0 where libsndfile cannot read the header).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import soundfile

from data_prep import files, metadata

COLUMNS: tuple[str, ...] = ("path", "tags", "split", "artist")
REQUIRED_COLUMNS: tuple[str, ...] = ("path", "tags")
TAG_DELIMITER = ";"
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, validation, test
FOLDER_NAME = "collection"
TAG_COUNTS_NAME = "tag_counts.tsv"
GROUNDTRUTH_NAME = "test_groundtruth.npy"
_FORBIDDEN_CHARACTERS = ("\t", "\n", "\r")  # they would break the TSVs' rows


class CollectionError(metadata.MetadataError):
    """A collection file that cannot be used; the message starts with ``file:line`` (or the file alone)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One audio file of the collection."""

    path: str  # relative to the audio folder, normalised
    tags: tuple[str, ...]
    split: str  # "" when the file has no split column
    artist: str  # "" when unknown: the track is an artist of its own
    line: int

    @property
    def track_id(self) -> str:
        return track_id_for(self.path)


def track_id_for(path: str) -> str:
    """The id of a collection's file: the same for the same path, whatever the other rows."""
    digest = hashlib.sha256(path.encode("utf-8")).digest()
    return f"track_{int.from_bytes(digest[:8], 'big') % 10**19:019d}"


def metadata_dir(data_dir: str | Path) -> Path:
    """Where `write_metadata` puts a collection's metadata: beside the shards of the data dir it is built into."""
    return Path(data_dir) / FOLDER_NAME


def _header(names: Sequence[str], where: str) -> dict[str, int]:
    columns = [name.strip().lower() for name in names]
    usage = "the columns are path and tags, and optionally split and artist"
    for column in columns:
        if column not in COLUMNS:
            raise CollectionError(f"{where}: unknown column {column!r}; {usage}")
        if columns.count(column) > 1:
            raise CollectionError(f"{where}: the column {column!r} is named twice")
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise CollectionError(f"{where}: no {' and no '.join(missing)} column in the header {list(names)}; {usage}")
    return {column: index for index, column in enumerate(columns)}


def _field(record: list[str], columns: dict[str, int], name: str, where: str) -> str:
    value = record[columns[name]].strip() if name in columns else ""
    if any(character in value for character in _FORBIDDEN_CHARACTERS):
        raise CollectionError(f"{where}: the {name} {value!r} holds a tab or a line break")
    return value


def _row(record: list[str], columns: dict[str, int], where: str, line: int) -> Row:
    if len(record) != len(columns):
        raise CollectionError(
            f"{where}: {len(record)} fields, the header names {len(columns)} (quote a field that holds the delimiter)"
        )
    path = _field(record, columns, "path", where)
    if not path:
        raise CollectionError(f"{where}: no path")
    if path.startswith("/"):
        raise CollectionError(f"{where}: {path} is absolute; give paths relative to the audio folder (--audio_dir)")
    tags = tuple(dict.fromkeys(tag.strip() for tag in _field(record, columns, "tags", where).split(TAG_DELIMITER)))
    tags = tuple(tag for tag in tags if tag)
    if not tags:
        raise CollectionError(f"{where}: {path} has no tags (give at least one, separated by '{TAG_DELIMITER}')")
    split = _field(record, columns, "split", where).lower()
    parts = ", ".join(metadata.SPLIT_PARTS)
    if "split" in columns and not split:
        raise CollectionError(f"{where}: no split for {path}; with a split column every row needs one of {parts}")
    if "split" in columns and split not in metadata.SPLIT_PARTS:
        raise CollectionError(f"{where}: unknown split {split!r} for {path}; expected one of {parts}")
    return Row(posixpath.normpath(path), tags, split, _field(record, columns, "artist", where), line)


def read_collection(tags_csv: str | Path) -> list[Row]:
    """The rows of a collection file, in file order; anything wrong raises ``CollectionError`` naming file and line."""
    tags_csv = Path(tags_csv)
    try:
        text = tags_csv.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CollectionError(f"{tags_csv}: no such file") from None
    except UnicodeDecodeError as error:
        raise CollectionError(f"{tags_csv}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise CollectionError(f"{tags_csv}: empty; expected a header such as 'path,tags' and one row per audio file")
    delimiter = "\t" if "\t" in text.splitlines()[0] else ","
    records = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = _header(next(records), f"{tags_csv}:1")
    rows: list[Row] = []
    first_line_of: dict[str, int] = {}
    for record in records:
        line = records.line_num
        if not any(field.strip() for field in record):
            continue
        row = _row(record, columns, f"{tags_csv}:{line}", line)
        if row.path in first_line_of:
            raise CollectionError(
                f"{tags_csv}:{line}: {row.path} is listed again (first on line {first_line_of[row.path]})"
            )
        first_line_of[row.path] = line
        rows.append(row)
    if not rows:
        raise CollectionError(f"{tags_csv}: no rows after the header")
    ids = collections.Counter(row.track_id for row in rows)
    if len(ids) < len(rows):
        clash = [row.path for row in rows if ids[row.track_id] > 1]
        raise CollectionError(f"{tags_csv}: the paths {clash} share a track id; rename one of them")
    return rows


def _group_key(row: Row) -> str:
    return f"artist:{row.artist}" if row.artist else f"path:{row.path}"


def make_split(
    rows: Sequence[Row], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, list[Row]]:
    """Train/validation/test parts of `rows` (in file order within each part), in `fractions` of the tracks, with
    every artist in one part and each tag in the parts' proportions as far as the artists allow.

    Iterative stratification (Sechidis et al., 2011) over artists: the tag with the fewest tracks still to place goes
    first, each of its artists (in a seeded random order) to the part that has none of the tag yet and room for
    about half the artist's tracks, else to the part that lacks the most of the tag, then of tracks."""
    groups: dict[str, list[Row]] = collections.defaultdict(list)
    for row in rows:
        groups[_group_key(row)].append(row)
    rng = np.random.default_rng(seed)
    keys = list(groups)
    order = [keys[index] for index in rng.permutation(len(keys))]
    group_tags = {key: collections.Counter(tag for row in groups[key] for tag in row.tags) for key in order}
    totals = collections.Counter(tag for row in rows for tag in row.tags)
    share = dict(zip(metadata.SPLIT_PARTS, fractions))
    tracks_wanted = {part: share[part] * len(rows) for part in metadata.SPLIT_PARTS}
    tags_wanted = {part: {tag: share[part] * count for tag, count in totals.items()} for part in metadata.SPLIT_PARTS}
    placed = {part: collections.Counter() for part in metadata.SPLIT_PARTS}
    part_of: dict[str, str] = {}
    waiting = order
    while waiting:
        remaining = collections.Counter()
        for key in waiting:
            remaining.update(group_tags[key])
        rarest = min(remaining, key=lambda tag: (remaining[tag], tag))
        for key in (key for key in waiting if rarest in group_tags[key]):
            size = len(groups[key])
            priorities = {
                part: (
                    placed[part][rarest] == 0 and tracks_wanted[part] >= size / 2,
                    tags_wanted[part][rarest],
                    tracks_wanted[part],
                    tie_break,
                )
                for part, tie_break in zip(metadata.SPLIT_PARTS, rng.random(len(metadata.SPLIT_PARTS)))
            }
            part = max(priorities, key=priorities.__getitem__)
            part_of[key] = part
            tracks_wanted[part] -= size
            for tag, count in group_tags[key].items():
                tags_wanted[part][tag] -= count
                placed[part][tag] += count
        waiting = [key for key in waiting if key not in part_of]
    return {part: [row for row in rows if part_of[_group_key(row)] == part] for part in metadata.SPLIT_PARTS}


def _header_duration(path: Path) -> float:
    """Seconds of audio the file's header announces; 0 where libsndfile cannot read it (missing, or a format only
    ffmpeg reads)."""
    try:
        return float(soundfile.info(str(path)).duration)
    except (OSError, RuntimeError):
        return 0.0


@dataclasses.dataclass(frozen=True)
class CollectionReport:
    """What `write_metadata` made of a collection file: its split, every tag's tracks per part, the kept tags."""

    source: Path
    metadata_dir: Path
    split_origin: str  # how the split was made, for the report
    tracks: dict[str, int]  # tracks per part of the written split
    counts: dict[str, dict[str, int]]  # every tag of the file -> part -> tracks, before tags are left out
    kept: tuple[str, ...]  # the label columns
    min_tag_tracks: int
    untagged: int  # tracks left out of the split: none of their tags is kept
    artists_in_several_parts: int  # with a split column: artists whose tracks are in more than one part

    @property
    def left_out(self) -> tuple[str, ...]:
        return tuple(tag for tag in sorted(self.counts) if tag not in self.kept)

    def _table(self, tags: Sequence[str]) -> list[str]:
        width = max(len("tag"), *(len(tag) for tag in tags))
        header = f"  {'tag':<{width}}  " + "  ".join(metadata.SPLIT_PARTS)
        return [header] + [
            f"  {tag:<{width}}  " + "  ".join(f"{self.counts[tag][part]:>{len(part)}}" for part in metadata.SPLIT_PARTS)
            for tag in tags
        ]

    def __str__(self) -> str:
        sizes = ", ".join(f"{part} {count}" for part, count in self.tracks.items())
        lines = [f"collection {self.source}: {self.split_origin}; tracks: {sizes}"]
        if self.artists_in_several_parts:
            several = _number(self.artists_in_several_parts, "artist")
            lines.append(f"  {several} with tracks in more than one part of the split column")
        lines.append(f"{_number(len(self.kept), 'tag')} kept, tracks per part:")
        lines += self._table(self.kept)
        if self.left_out:
            fewer = _number(self.min_tag_tracks, "track")
            lines.append(
                f"{_number(len(self.left_out), 'tag')} left out, with fewer than {fewer} in a part "
                "(--keep_rare_tags keeps them):"
            )
            lines += self._table(self.left_out)
        if self.untagged:
            lines.append(f"{_number(self.untagged, 'track')} without a kept tag left out of the split")
        lines.append(f"written: {self.metadata_dir} (the split's TSVs, tags/collection.txt, {TAG_COUNTS_NAME})")
        return "\n".join(lines)


def _number(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _describe_split(rows: Sequence[Row], fractions: Sequence[float], seed: int) -> str:
    percent = "/".join(f"{100 * fraction:g}" for fraction in fractions)
    artists = {row.artist for row in rows if row.artist}
    grouping = f"artist-disjoint over {len(artists)} artists" if artists else "no artist column: track by track"
    return f"split made with seed {seed}, {percent} %, {grouping}"


def write_metadata(
    tags_csv: str | Path,
    audio_dir: str | Path,
    out_dir: str | Path,
    split_index: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    min_tag_tracks: int = 1,
    keep_rare_tags: bool = False,
) -> CollectionReport:
    """Reads a collection file, splits it (unless it has a split column), chooses its tags and writes its metadata
    in MTG-Jamendo's layout into `out_dir` (see the module docstring); the same file and arguments give the same
    files. CollectionError for a bad file, or when no tag has `min_tag_tracks` tracks in every part."""
    tags_csv, out_dir = Path(tags_csv), Path(out_dir)
    rows = read_collection(tags_csv)
    if any(row.split for row in rows):
        parts = {part: [row for row in rows if row.split == part] for part in metadata.SPLIT_PARTS}
        origin = "split from its split column"
    else:
        parts = make_split(rows, fractions, seed)
        origin = _describe_split(rows, fractions, seed)
    empty = [part for part, members in parts.items() if not members]
    if empty:
        raise CollectionError(
            f"{tags_csv}: no track in {' or '.join(empty)}: {len(rows)} tracks "
            f"({len({_group_key(row) for row in rows})} artists) are too few for three parts"
        )
    counts = {
        tag: {part: sum(tag in row.tags for row in members) for part, members in parts.items()}
        for tag in sorted({tag for row in rows for tag in row.tags})
    }
    kept = tuple(tag for tag, per_part in counts.items() if keep_rare_tags or min(per_part.values()) >= min_tag_tracks)
    if not kept:
        raise CollectionError(
            f"{tags_csv}: no tag has {min_tag_tracks} track(s) in each of train, validation and test; "
            "give more tracks, a smaller --min_tag_tracks, or --keep_rare_tags"
        )
    tracks = {
        row.path: metadata.Track(
            track_id=row.track_id,
            artist_id=row.artist,
            album_id="",
            path=row.path,
            duration=_header_duration(Path(audio_dir) / row.path),
            tags=row.tags,
            line=row.line,
            source=str(tags_csv),
        )
        for row in rows
    }
    kept_set = set(kept)
    split_tracks = {
        part: [
            dataclasses.replace(track, tags=tuple(tag for tag in track.tags if tag in kept_set))
            for track in (tracks[row.path] for row in members)
            if kept_set & set(track.tags)
        ]
        for part, members in parts.items()
    }
    subset = metadata.COLLECTION
    metadata.write_tracks(metadata.full_tsv_path(out_dir, subset), tracks.values())
    for part, members in split_tracks.items():
        metadata.write_tracks(metadata.split_tsv_path(out_dir, split_index, part, subset), members)
    metadata.write_tag_list(metadata.tag_list_path(out_dir, subset), kept)
    metadata.write_lines(
        out_dir / TAG_COUNTS_NAME,
        ["\t".join(("tag", *metadata.SPLIT_PARTS, "kept"))]
        + [
            "\t".join((tag, *map(str, per_part.values()), str(tag in kept_set).lower()))
            for tag, per_part in counts.items()
        ],
    )
    groundtruth = [metadata.track_labels(track, kept) for track in split_tracks["test"]]
    files.write_atomically(
        metadata.split_tsv_path(out_dir, split_index, "test", subset).with_name(GROUNDTRUTH_NAME),
        np.array(groundtruth, bool).reshape(len(groundtruth), len(kept)),
    )
    artist_parts: Mapping[str, set[str]] = collections.defaultdict(set)
    for part, members in parts.items():
        for row in members:
            if row.artist:
                artist_parts[row.artist].add(part)
    return CollectionReport(
        source=tags_csv,
        metadata_dir=out_dir,
        split_origin=origin,
        tracks={part: len(members) for part, members in split_tracks.items()},
        counts=counts,
        kept=kept,
        min_tag_tracks=min_tag_tracks,
        untagged=sum(len(members) for members in parts.values()) - sum(len(m) for m in split_tracks.values()),
        artists_in_several_parts=sum(len(found) > 1 for found in artist_parts.values()),
    )
