"""Data preparation as a library: MTG-Jamendo audio (or the organisers' .npy mels) into a prepared dataset, for any
of its auto-tagging subsets, or a user's own collection described by a CSV (``data_prep.collection``).

Stage 1 (``data_prep.extract``) caches every track's features under ``DATA_DIR/cache/<features>/`` with a journal,
in parallel and resumably; stage 2 (``data_prep.shard_writer``) writes the TFRecord shards of ``DATA_DIR/split-<k>/``
from that cache. Every track of the split ends in the shards or in ``failures.tsv`` beside them, with its reason;
byte-identical input files are reported in ``duplicates.tsv`` and can be dropped. TensorFlow is imported only when
stage 2 starts, so that extraction starts at once and its spawned workers never load it. The command line is
``python -m data_prep.build``.

A data dir holds one tag set: the subset (or ``collection``) is stored in each dataset's ``metadata.json`` beside
its tags, and a build of another tag set into it is refused, so that no build replaces another's shards.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_prep import collection, extract, files, layout, reader, worker_pool
from data_prep import features as features_lib
from data_prep import metadata as metadata_lib
from data_prep.deadline import DEFAULT_DEADLINE, Deadline

if TYPE_CHECKING:
    from data_prep import shard_writer

DUPLICATE_POLICIES: tuple[str, ...] = ("none", "keep_one", "all")
# keep_one keeps the copy in the part that matters most for evaluation.
_PART_PRIORITY = {"test": 0, "validation": 1, "train": 2}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What `build_dataset` prepares, from where, and how; the values are checked on creation, before any work."""

    audio_dir: str | Path  # input root: NN/ID.mp3, or for essentia96 the organisers' NN/ID.npy files
    metadata_dir: str | Path | None  # the MTG-Jamendo data/ dir: TSVs, splits/, tags/; None with tags_csv
    data_dir: str | Path  # output root: cache/ and split-K/ (see data_prep.layout)
    features: str = "hop512"  # the feature setting, a name of data_prep.features.CONFIGS
    split_index: int = 0  # 0 is the MediaEval 2019 split
    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)  # extraction processes
    drop_duplicates: str = "none"  # one of DUPLICATE_POLICIES
    retry_failed: bool = False  # extract the tracks that failed last time again
    delete_cache: bool = False  # delete the feature cache after the build
    cache_dir: str | Path | None = None  # default: layout.cache_dir(data_dir, features)
    progress: bool = True
    # Frames per stored chunk instead of the setting's 20 s: the tests and the demo use short chunks to exercise
    # multi-chunk tracks cheaply.
    chunk_frames: int | None = None
    memory_budget_gb: float = worker_pool.DEFAULT_MEMORY_BUDGET_GB  # bound on the workers' estimated memory
    tracks_per_worker: int = worker_pool.DEFAULT_TRACKS_PER_WORKER  # a worker is replaced after this many tracks
    # A file at another sample rate or with more channels is resampled and mixed down (as the tagger does) instead
    # of failing (a stereo setting still refuses more than two channels); off by default, so that odd files in the
    # dataset are reported.
    resample: bool = False
    # How long a worker may hold one track before it is killed and the track reported as `timeout`.
    track_deadline: Deadline = DEFAULT_DEADLINE
    subset: str = metadata_lib.DEFAULT_SUBSET  # the MTG-Jamendo subset: its TSVs and its tags (metadata.SUBSETS)
    # A user's own collection instead of MTG-Jamendo: a CSV or TSV of path,tags[,split][,artist] rows, paths relative
    # to audio_dir, written in MTG-Jamendo's layout into DATA_DIR/collection/ first (data_prep.collection). Its files
    # are always resampled and mixed down, as tagging does.
    tags_csv: str | Path | None = None
    split_fractions: tuple[float, float, float] = collection.DEFAULT_FRACTIONS  # train, validation, test
    split_seed: int = 0  # the collection's split, when its file has no split column
    min_tag_tracks: int = 1  # a collection's tag is left out unless each part has this many of its tracks
    keep_rare_tags: bool = False  # keep them all the same

    def __post_init__(self) -> None:
        features_lib.settings_for(self.features)  # an unknown name fails with the list of valid ones
        if self.drop_duplicates not in DUPLICATE_POLICIES:
            raise ValueError(f"drop_duplicates={self.drop_duplicates!r}: expected one of {DUPLICATE_POLICIES}")
        if self.subset not in metadata_lib.SUBSETS:
            raise ValueError(f"subset={self.subset!r}: expected one of {metadata_lib.SUBSETS}")
        if (self.metadata_dir is None) == (self.tags_csv is None):
            raise ValueError(
                "give metadata_dir (MTG-Jamendo's data/ folder) or tags_csv (your own collection), one of the two"
            )
        if self.tags_csv is not None and self.subset != metadata_lib.DEFAULT_SUBSET:
            raise ValueError(f"subset={self.subset!r} is an MTG-Jamendo subset; a collection (tags_csv) has its tags")
        if (
            len(self.split_fractions) != 3
            or min(self.split_fractions) <= 0
            or abs(sum(self.split_fractions) - 1) > 1e-6
        ):
            raise ValueError(
                f"split_fractions={self.split_fractions}: expected three positive fractions (train, validation, test) "
                "that sum to 1, such as 0.8,0.1,0.1"
            )
        minimums = {"split_index": 0, "workers": 1, "tracks_per_worker": 1, "chunk_frames": 1, "min_tag_tracks": 1}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"{name}={value}: need at least {minimum}")
        if self.memory_budget_gb <= 0:
            raise ValueError(f"memory_budget_gb={self.memory_budget_gb}: must be positive")

    @property
    def tag_subset(self) -> str:
        """The subset whose metadata the build reads: the MTG-Jamendo one, or ``collection``."""
        return metadata_lib.COLLECTION if self.tags_csv is not None else self.subset

    @property
    def metadata_root(self) -> Path:
        """The metadata the build reads: MTG-Jamendo's, or the one written from the collection file."""
        return collection.metadata_dir(self.data_dir) if self.tags_csv is not None else Path(self.metadata_dir)

    @property
    def resamples(self) -> bool:
        return self.resample or self.tags_csv is not None

    @property
    def cache_root(self) -> Path:
        """Stage 1's cache: `cache_dir`, or the one of the data dir and feature setting."""
        return Path(self.cache_dir) if self.cache_dir else layout.cache_dir(self.data_dir, self.features)

    @property
    def dataset_dir(self) -> Path:
        return layout.dataset_dir(self.data_dir, self.features, self.split_index)


@dataclasses.dataclass(frozen=True)
class BuildSummary:
    """What a build did: tracks per part in the shards, failures per reason, duplicate groups."""

    dataset_dir: Path
    tracks: dict[str, int]
    examples: dict[str, int]
    failures: dict[str, int]  # failure kind -> count
    duplicate_groups: int
    failures_report: Path
    tags: tuple[str, ...] = ()  # the label columns
    subset: str = metadata_lib.DEFAULT_SUBSET  # an MTG-Jamendo subset, or "collection"

    def __str__(self) -> str:
        source = "a collection's" if self.subset == metadata_lib.COLLECTION else f"MTG-Jamendo {self.subset}"
        lines = [f"dataset: {self.dataset_dir}", f"tags: {len(self.tags)} ({source})"]
        for part, count in self.tracks.items():
            lines.append(f"  {part}: {count} tracks, {self.examples[part]} examples")
        failed = sum(self.failures.values())
        lines.append(f"failed: {failed} tracks" + (f" (see {self.failures_report})" if failed else ""))
        lines += [f"  {kind}: {count}" for kind, count in sorted(self.failures.items())]
        lines.append(f"groups of byte-identical input files: {self.duplicate_groups}")
        if self.duplicate_groups:
            report = self.dataset_dir / "duplicates.tsv"
            lines.append(f"  see {report}; --drop_duplicates keep_one|all leaves copies out")
        return "\n".join(lines)


def read_parts(
    metadata_dir: str | Path, split_index: int, subset: str = metadata_lib.DEFAULT_SUBSET, tags: Sequence[str] = ()
) -> dict[str, list[metadata_lib.Track]]:
    """The tracks of each part of a split; a track listed in two parts is an error naming both. `tags`: the tag
    list, if read already."""
    tags = tags or metadata_lib.read_tag_list(metadata_dir, subset, split_index)
    parts = {
        part: metadata_lib.read_split(metadata_dir, split_index, part, subset, tags)
        for part in metadata_lib.SPLIT_PARTS
    }
    seen: dict[str, str] = {}
    for tracks in parts.values():
        for track in tracks:
            if track.track_id in seen:
                raise metadata_lib.MetadataError(
                    f"{track.location}: {track.track_id} is also in {seen[track.track_id]}"
                )
            seen[track.track_id] = track.location
    return parts


def duplicate_groups(
    parts: dict[str, list[metadata_lib.Track]], outcomes: dict[str, extract.Outcome]
) -> list[list[tuple[str, metadata_lib.Track]]]:
    """Groups of (part, track) whose input files are byte-identical (same SHA-256), in split order; only
    tracks with features count (two empty files are a failure each, not a duplicate)."""
    by_hash: dict[str, list[tuple[str, metadata_lib.Track]]] = collections.defaultdict(list)
    for part, tracks in parts.items():
        for track in tracks:
            if outcomes[track.track_id].ok:
                by_hash[outcomes[track.track_id].sha256].append((part, track))
    return [group for group in by_hash.values() if len(group) > 1]


def duplicates_to_drop(groups: list[list[tuple[str, metadata_lib.Track]]], policy: str) -> dict[str, str]:
    """Track ids to leave out, each with its reason: none, all but the copy in the most important part,
    or every copy."""
    if policy not in DUPLICATE_POLICIES:
        raise ValueError(f"drop_duplicates={policy!r}: expected one of {DUPLICATE_POLICIES}")
    dropped = {}
    for group in groups if policy != "none" else []:
        ranked = sorted(group, key=lambda member: _PART_PRIORITY[member[0]])
        for _, track in ranked if policy == "all" else ranked[1:]:
            others = ", ".join(other.track_id for _, other in group if other is not track)
            dropped[track.track_id] = f"byte-identical to {others} (--drop_duplicates {policy})"
    return dropped


def failure_records(
    parts: dict[str, list[metadata_lib.Track]],
    outcomes: dict[str, extract.Outcome],
    dropped: dict[str, str],
) -> list[dict]:
    """One record per track of the split that stays out of the shards, with its kind and reason."""
    records = []
    for part, tracks in parts.items():
        for track in tracks:
            outcome = outcomes[track.track_id]
            if outcome.ok and track.track_id not in dropped:
                continue
            kind, reason = (outcome.kind, outcome.reason) if not outcome.ok else ("duplicate", dropped[track.track_id])
            records.append(
                {"track_id": track.track_id, "part": part, "path": outcome.path, "kind": kind, "reason": reason}
            )
    return records


def duplicate_records(
    groups: list[list[tuple[str, metadata_lib.Track]]], outcomes: dict[str, extract.Outcome]
) -> list[dict]:
    """One record per member of each duplicate group, for duplicates.tsv."""
    return [
        {
            "group": number,
            "part": part,
            "track_id": track.track_id,
            "artist_id": track.artist_id,
            "sha256": outcomes[track.track_id].sha256,
            "tags": " ".join(track.tags),
        }
        for number, group in enumerate(groups)
        for part, track in group
    ]


def _write_tsv(path: Path, records: list[dict], columns: tuple[str, ...]) -> None:
    rows = ["\t".join(columns)] + ["\t".join(str(record[column]) for column in columns) for record in records]
    metadata_lib.write_lines(path, rows)


class BuildError(Exception):
    """A build that cannot produce a usable dataset; its message is one line for the user."""


def _plan(
    options: BuildOptions,
    cache: extract.TrackCache,
    tags: tuple[str, ...],
    parts: dict[str, list[metadata_lib.Track]],
) -> shard_writer.ShardPlan:
    """Stage 1 (features into the cache), then what stage 2 is to write (a ``shard_writer.ShardPlan``)."""
    settings = features_lib.settings_for(options.features)
    jobs = [
        extract.TrackJob(track.track_id, features_lib.source_path(track.path, settings), track.duration)
        for tracks in parts.values()
        for track in tracks
    ]
    outcomes = extract.extract_all(
        jobs,
        Path(options.audio_dir),
        cache,
        settings,
        options.workers,
        retry_failed=options.retry_failed,
        progress=options.progress,
        memory_budget_gb=options.memory_budget_gb,
        tracks_per_worker=options.tracks_per_worker,
        resample=options.resamples,
        deadline=options.track_deadline,
    )
    groups = duplicate_groups(parts, outcomes)
    dropped = duplicates_to_drop(groups, options.drop_duplicates)
    failures = failure_records(parts, outcomes, dropped)
    left_out = {record["track_id"] for record in failures}
    training = [outcomes[track.track_id] for track in parts["train"]]
    if all(track.track_id in left_out for track in parts["train"]):
        kinds = collections.Counter(outcome.kind for outcome in training)
        example = next((o for o in training if not o.ok), None)
        raise BuildError(
            f"none of the {len(training)} training tracks could be prepared "
            f"({', '.join(f'{count} {kind}' for kind, count in kinds.most_common())}"
            f"{f', e.g. {Path(options.audio_dir) / example.path}' if example else ''}); check --audio_dir"
            + (" and --features" if settings.source == "npy" else "")
        )
    # TensorFlow is imported only now: extraction starts at once, and spawned workers never load it.
    from data_prep import shard_writer

    return shard_writer.ShardPlan(
        cache=cache,
        settings=dataclasses.replace(settings, chunk_frames=options.chunk_frames or settings.chunk_frames),
        tags=tags,
        parts={
            part: tuple(track for track in tracks if track.track_id not in left_out) for part, tracks in parts.items()
        },
        extra_metadata={
            "subset": options.tag_subset,
            "split_index": options.split_index,
            "tsv_track_ids": {part: [track.track_id for track in tracks] for part, tracks in parts.items()},
            "failures": failures,
            "duplicates": duplicate_records(groups, outcomes),
            "drop_duplicates": options.drop_duplicates,
        },
    )


def build_dataset(options: BuildOptions) -> BuildSummary:
    """Extracts features (resuming from the cache) and writes the shards of one feature setting and split.

    A prepared dataset is rewritten only when the tracks it would hold change: a missing or unreadable file that is
    now there, a failed track that ``retry_failed`` mends, or one at another rate that ``resample`` takes in.
    Raises BuildError, whose one line says what to do, when no training track can be prepared, when the metadata
    is not where it is looked for or is malformed, and when a write fails for want of space (what was written
    before stays: the feature cache, and complete shards).
    """
    try:
        _check_tag_set(options)
        if options.tags_csv is not None:
            print(
                collection.write_metadata(
                    options.tags_csv,
                    options.audio_dir,
                    options.metadata_root,
                    options.split_index,
                    options.split_fractions,
                    options.split_seed,
                    options.min_tag_tracks,
                    options.keep_rare_tags,
                )
            )
        metadata_lib.check_metadata_dir(options.metadata_root, options.split_index, options.tag_subset)
        return _build(options)
    except metadata_lib.MetadataError as error:
        raise BuildError(str(error)) from error
    except OSError as error:
        if error.errno not in files.DISK_FULL_ERRNOS:
            raise
        where = f" ({error.filename})" if error.filename else ""
        raise BuildError(
            f"out of disk space: {error.strerror}{where}; free space and run the same command again"
        ) from error


def _describe(subset: str) -> str:
    return "a collection (--tags_csv)" if subset == metadata_lib.COLLECTION else f"MTG-Jamendo's {subset} subset"


def _check_tag_set(options: BuildOptions) -> None:
    """BuildError when the data dir holds a prepared dataset of another subset (or of a collection): the shards'
    folder does not name the tags, so one build would replace the other's."""
    for features, split_index in reader.prepared_datasets(options.data_dir):
        directory = layout.dataset_dir(options.data_dir, features, split_index)
        stored = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
        subset = stored.get("subset", metadata_lib.DEFAULT_SUBSET)
        if subset != options.tag_subset:
            raise BuildError(
                f"{options.data_dir} holds {_describe(subset)} ({directory}); prepare "
                f"{_describe(options.tag_subset)} in a --data_dir of its own"
            )


def _holds_other_metadata(
    prepared: reader.PreparedDataset, tags: tuple[str, ...], parts: dict[str, list[metadata_lib.Track]]
) -> bool:
    """Whether the metadata now lists other tracks, tags or labels than a prepared dataset was built from."""
    if prepared.tags != tags or prepared.tsv_track_ids != {
        part: tuple(track.track_id for track in tracks) for part, tracks in parts.items()
    }:
        return True
    for part, tracks in parts.items():
        by_id = {track.track_id: track for track in tracks}
        labels = [metadata_lib.track_labels(by_id[track_id], tags) for track_id in prepared.parts[part].track_ids]
        if not np.array_equal(np.reshape(labels, prepared.parts[part].labels.shape), prepared.parts[part].labels):
            return True
    return False


def _build(options: BuildOptions) -> BuildSummary:
    cache = extract.TrackCache(options.cache_root)
    directory = options.dataset_dir
    data_dir, features, split_index = options.data_dir, options.features, options.split_index
    tags = metadata_lib.read_tag_list(options.metadata_root, options.tag_subset, split_index)
    parts = read_parts(options.metadata_root, split_index, options.tag_subset, tags)
    prepared = (
        reader.load_prepared(data_dir, features, split_index)
        if layout.is_prepared(data_dir, features, split_index)
        else None
    )
    changed = prepared is not None and _holds_other_metadata(prepared, tags, parts)
    failed = (
        []
        if prepared is None
        else [
            record
            for record in prepared.failure_records
            if options.retry_failed
            or (record["kind"] in extract.RELOOKED_KINDS and (Path(options.audio_dir) / record["path"]).exists())
            or (options.resamples and record["kind"] in extract.RESAMPLED_KINDS)
        ]
    )
    if prepared is not None and not failed and not changed:
        print(f"already prepared: {directory}")
    else:
        plan = _plan(options, cache, tags, parts)
        stored = None if prepared is None or changed else prepared.track_ids
        if stored == {part: tuple(track.track_id for track in tracks) for part, tracks in plan.parts.items()}:
            print(f"already prepared, and the {len(failed)} tracks tried again still fail: {directory}")
        else:
            from data_prep import shard_writer

            if prepared is not None:
                reason = (
                    "its metadata lists other tracks, tags or labels" if changed else "the tracks it holds have changed"
                )
                print(f"rebuilding {directory}: {reason}")
                shutil.rmtree(directory)
            shard_writer.write_shards(plan, data_dir, features, split_index, options.progress)
    prepared = reader.load_prepared(data_dir, features, split_index)
    stored = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
    _write_tsv(directory / "failures.tsv", stored["failures"], ("track_id", "part", "path", "kind", "reason"))
    _write_tsv(
        directory / "duplicates.tsv", stored["duplicates"], ("group", "part", "track_id", "artist_id", "sha256", "tags")
    )
    if options.delete_cache and cache.root.exists():
        shutil.rmtree(cache.root)
    return BuildSummary(
        dataset_dir=directory,
        tracks={part: len(ids) for part, ids in prepared.track_ids.items()},
        examples=prepared.num_examples,
        failures=dict(collections.Counter(record["kind"] for record in stored["failures"])),
        duplicate_groups=len({record["group"] for record in stored["duplicates"]}),
        failures_report=directory / "failures.tsv",
        tags=prepared.tags,
        subset=stored.get("subset", metadata_lib.DEFAULT_SUBSET),
    )
