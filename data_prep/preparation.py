"""Data preparation as a library: MTG-Jamendo audio (or the organisers' .npy mels) into a prepared dataset.

Stage 1 (``data_prep.extract``) caches every track's features under ``DATA_DIR/cache/<features>/`` with a journal,
in parallel and resumably; stage 2 (``data_prep.shard_writer``) writes the TFRecord shards of ``DATA_DIR/split-<k>/``
from that cache. Every track of the split ends in the shards or in ``failures.tsv`` beside them, with its reason;
byte-identical input files are reported in ``duplicates.tsv`` and can be dropped. TensorFlow is imported only when
stage 2 starts, so that extraction starts at once and its spawned workers never load it. The command line is
``python -m data_prep.build``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from data_prep import extract, files, layout, reader, worker_pool
from data_prep import features as features_lib
from data_prep import metadata as metadata_lib

if TYPE_CHECKING:
    from data_prep import shard_writer

DUPLICATE_POLICIES: tuple[str, ...] = ("none", "keep_one", "all")
# keep_one keeps the copy in the part that matters most for evaluation.
_PART_PRIORITY = {"test": 0, "validation": 1, "train": 2}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What `build_dataset` prepares, from where, and how; the values are checked on creation, before any work."""

    audio_dir: str | Path  # input root: NN/ID.mp3, or for essentia96 the organisers' NN/ID.npy files
    metadata_dir: str | Path  # the MTG-Jamendo data/ dir: TSVs, splits/, tags/
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
    track_deadline: worker_pool.TrackDeadline = worker_pool.DEFAULT_TRACK_DEADLINE

    def __post_init__(self) -> None:
        features_lib.settings_for(self.features)  # an unknown name fails with the list of valid ones
        if self.drop_duplicates not in DUPLICATE_POLICIES:
            raise ValueError(f"drop_duplicates={self.drop_duplicates!r}: expected one of {DUPLICATE_POLICIES}")
        for name, minimum in {"split_index": 0, "workers": 1, "tracks_per_worker": 1, "chunk_frames": 1}.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"{name}={value}: need at least {minimum}")
        if self.memory_budget_gb <= 0:
            raise ValueError(f"memory_budget_gb={self.memory_budget_gb}: must be positive")

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

    def __str__(self) -> str:
        lines = [f"dataset: {self.dataset_dir}"]
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


def read_parts(metadata_dir: str | Path, split_index: int) -> dict[str, list[metadata_lib.Track]]:
    """The tracks of each part of a split; a track listed in two parts is an error naming both."""
    parts = {part: metadata_lib.read_split(metadata_dir, split_index, part) for part in metadata_lib.SPLIT_PARTS}
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
    tmp = path.with_name(path.name + ".tmp")
    rows = ["\t".join(columns)] + ["\t".join(str(record[column]) for column in columns) for record in records]
    tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class BuildError(Exception):
    """A build that cannot produce a usable dataset; its message is one line for the user."""


def _plan(options: BuildOptions, cache: extract.TrackCache) -> shard_writer.ShardPlan:
    """Stage 1 (features into the cache), then what stage 2 is to write (a ``shard_writer.ShardPlan``)."""
    settings = features_lib.settings_for(options.features)
    tags = metadata_lib.read_tag_list(options.metadata_dir)
    parts = read_parts(options.metadata_dir, options.split_index)
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
        resample=options.resample,
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
        metadata_lib.check_metadata_dir(options.metadata_dir, options.split_index)
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


def _build(options: BuildOptions) -> BuildSummary:
    cache = extract.TrackCache(options.cache_root)
    directory = options.dataset_dir
    data_dir, features, split_index = options.data_dir, options.features, options.split_index
    prepared = (
        reader.load_prepared(data_dir, features, split_index)
        if layout.is_prepared(data_dir, features, split_index)
        else None
    )
    failed = (
        []
        if prepared is None
        else [
            record
            for record in prepared.failure_records
            if options.retry_failed
            or (record["kind"] in extract.RELOOKED_KINDS and (Path(options.audio_dir) / record["path"]).exists())
            or (options.resample and record["kind"] in extract.RESAMPLED_KINDS)
        ]
    )
    if prepared is not None and not failed:
        print(f"already prepared: {directory}")
    else:
        plan = _plan(options, cache)
        stored = None if prepared is None else prepared.track_ids
        if stored == {part: tuple(track.track_id for track in tracks) for part, tracks in plan.parts.items()}:
            print(f"already prepared, and the {len(failed)} tracks tried again still fail: {directory}")
        else:
            from data_prep import shard_writer

            if prepared is not None:
                print(f"rebuilding {directory}: the tracks it holds have changed")
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
    )
