"""The batch step that turns MTG-Jamendo audio (or the organisers' .npy mels) into TFRecord shards.

    python -m data_prep.build --audio_dir A --metadata_dir M --data_dir D --config hop512 --split 0 --workers N

Stage 1 (``data_prep.extract``) caches every track's features under ``D/cache/<config>/`` with a journal,
in parallel and resumably; stage 2 (``data_prep.builder``) writes the shards of ``D/split-<k>/`` from that
cache. Every track of the split ends in the shards or in ``failures.tsv`` beside them, with its reason;
byte-identical input files are reported in ``duplicates.tsv`` and can be dropped (``--drop_duplicates``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from data_prep import extract, layout, reader
from data_prep import features as features_lib
from data_prep import metadata as metadata_lib

DUPLICATE_POLICIES: tuple[str, ...] = ("none", "keep_one", "all")
# keep_one keeps the copy in the part that matters most for evaluation.
_PART_PRIORITY = {"test": 0, "validation": 1, "train": 2}


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


def _plan(
    audio_dir: Path,
    metadata_dir: Path,
    config_name: str,
    split_index: int,
    workers: int,
    cache: extract.TrackCache,
    drop_duplicates: str,
    retry_failed: bool,
    progress: bool,
    chunk_frames: int | None,
    memory_budget_gb: float,
    tracks_per_worker: int,
    resample: bool,
):
    """Stage 1 (features into the cache), then what stage 2 is to write (a ``builder.ShardPlan``)."""
    settings = features_lib.settings_for(config_name)
    tags = metadata_lib.read_tag_list(metadata_dir)
    parts = read_parts(metadata_dir, split_index)
    jobs = [
        extract.TrackJob(track.track_id, features_lib.source_path(track.path, settings), track.duration)
        for tracks in parts.values()
        for track in tracks
    ]
    outcomes = extract.extract_all(
        jobs,
        audio_dir,
        cache,
        settings,
        workers,
        retry_failed=retry_failed,
        progress=progress,
        memory_budget_gb=memory_budget_gb,
        tracks_per_worker=tracks_per_worker,
        resample=resample,
    )
    groups = duplicate_groups(parts, outcomes)
    dropped = duplicates_to_drop(groups, drop_duplicates)
    failures = failure_records(parts, outcomes, dropped)
    left_out = {record["track_id"] for record in failures}
    training = [outcomes[track.track_id] for track in parts["train"]]
    if all(track.track_id in left_out for track in parts["train"]):
        kinds = collections.Counter(outcome.kind for outcome in training)
        example = next((o for o in training if not o.ok), None)
        raise BuildError(
            f"none of the {len(training)} training tracks could be prepared "
            f"({', '.join(f'{count} {kind}' for kind, count in kinds.most_common())}"
            f"{f', e.g. {Path(audio_dir) / example.path}' if example else ''}); check --audio_dir"
            + (" and --config" if settings.source == "npy" else "")
        )
    # TensorFlow is imported only now: extraction starts at once, and spawned workers never load it.
    from data_prep import builder as builder_lib

    return builder_lib.ShardPlan(
        cache=cache,
        settings=dataclasses.replace(settings, chunk_frames=chunk_frames or settings.chunk_frames),
        tags=tags,
        parts={
            part: tuple(track for track in tracks if track.track_id not in left_out) for part, tracks in parts.items()
        },
        extra_metadata={
            "split_index": split_index,
            "tsv_track_ids": {part: [track.track_id for track in tracks] for part, tracks in parts.items()},
            "failures": failures,
            "duplicates": duplicate_records(groups, outcomes),
            "drop_duplicates": drop_duplicates,
        },
    )


def build_dataset(
    audio_dir: str | Path,
    metadata_dir: str | Path,
    data_dir: str | Path,
    config_name: str = "hop512",
    split_index: int = 0,
    workers: int = os.cpu_count() or 1,
    *,
    drop_duplicates: str = "none",
    retry_failed: bool = False,
    delete_cache: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    chunk_frames: int | None = None,
    memory_budget_gb: float = extract.DEFAULT_MEMORY_BUDGET_GB,
    tracks_per_worker: int = extract.DEFAULT_TRACKS_PER_WORKER,
    resample: bool = False,
) -> BuildSummary:
    """Extracts features (resuming from the cache) and writes the shards of one config and split.

    ``audio_dir`` is the input root: MP3s as ``NN/ID.mp3``, or for ``essentia96`` the ``NN/ID.npy`` files.
    ``chunk_frames`` overrides the setting's stored chunk length (20 s); the tests and the demo use short chunks
    to exercise multi-chunk tracks cheaply. A prepared dataset is rewritten only when the tracks it would hold
    change: a missing or unreadable file that is now there, or a failed track that ``retry_failed`` mends.
    ``resample``: a file at another sample rate or with more channels is resampled and mixed down (as the tagger
    does) instead of failing; off by default, so that odd files in the dataset are reported.
    Raises BuildError when no training track can be prepared.
    """
    if chunk_frames is not None and chunk_frames < 1:
        raise ValueError(f"chunk_frames={chunk_frames}: need at least 1")
    features_lib.settings_for(config_name)
    duplicates_to_drop([], drop_duplicates)  # validates the policy before any work
    cache = extract.TrackCache(Path(cache_dir) if cache_dir else layout.cache_dir(data_dir, config_name))
    directory = layout.dataset_dir(data_dir, config_name, split_index)
    prepared = (
        reader.load_prepared(data_dir, config_name, split_index)
        if layout.is_prepared(data_dir, config_name, split_index)
        else None
    )
    failed = (
        []
        if prepared is None
        else [
            record
            for record in prepared.failure_records
            if retry_failed
            or (record["kind"] in extract.RELOOKED_KINDS and (Path(audio_dir) / record["path"]).exists())
            or (resample and record["kind"] in extract.RESAMPLED_KINDS)
        ]
    )
    if prepared is not None and not failed:
        print(f"already prepared: {directory}")
    else:
        plan = _plan(
            Path(audio_dir),
            Path(metadata_dir),
            config_name,
            split_index,
            workers,
            cache,
            drop_duplicates,
            retry_failed,
            progress,
            chunk_frames,
            memory_budget_gb,
            tracks_per_worker,
            resample,
        )
        stored = None if prepared is None else prepared.track_ids
        if stored == {part: tuple(track.track_id for track in tracks) for part, tracks in plan.parts.items()}:
            print(f"already prepared, and the {len(failed)} tracks tried again still fail: {directory}")
        else:
            from data_prep import builder as builder_lib

            if prepared is not None:
                print(f"rebuilding {directory}: the tracks it holds have changed")
                shutil.rmtree(directory)
            builder_lib.write_shards(plan, data_dir, config_name, split_index, progress)
    prepared = reader.load_prepared(data_dir, config_name, split_index)
    stored = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
    _write_tsv(directory / "failures.tsv", stored["failures"], ("track_id", "part", "path", "kind", "reason"))
    _write_tsv(
        directory / "duplicates.tsv", stored["duplicates"], ("group", "part", "track_id", "artist_id", "sha256", "tags")
    )
    if delete_cache and cache.root.exists():
        shutil.rmtree(cache.root)
    return BuildSummary(
        dataset_dir=directory,
        tracks={part: len(ids) for part, ids in prepared.track_ids.items()},
        examples=prepared.num_examples,
        failures=dict(collections.Counter(record["kind"] for record in stored["failures"])),
        duplicate_groups=len({record["group"] for record in stored["duplicates"]}),
        failures_report=directory / "failures.tsv",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_prep.build", description=__doc__.split("\n")[0])
    parser.add_argument("--audio_dir", required=True, help="input root: NN/ID.mp3 (or NN/ID.npy for essentia96)")
    parser.add_argument("--metadata_dir", required=True, help="MTG-Jamendo data/ dir: TSVs, splits/, tags/")
    parser.add_argument("--data_dir", required=True, help="output: cache/, split-K/ with the TFDS shards")
    parser.add_argument("--config", default="hop512", choices=tuple(features_lib.CONFIGS), help="feature setting")
    parser.add_argument("--split", type=int, default=0, help="split index (0 is the MediaEval 2019 split)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="extraction processes")
    parser.add_argument(
        "--drop_duplicates",
        default="none",
        choices=DUPLICATE_POLICIES,
        help="byte-identical files: report only, keep one copy (test > validation > train), drop all",
    )
    parser.add_argument("--retry_failed", action="store_true", help="extract failed tracks again")
    parser.add_argument(
        "--resample",
        action="store_true",
        help="resample other sample rates and mix down other channel counts instead of failing them",
    )
    parser.add_argument("--delete_cache", action="store_true", help="delete the feature cache after the build")
    parser.add_argument("--cache_dir", default=None, help="feature cache (default DATA_DIR/cache/CONFIG)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--chunk_frames",
        type=int,
        default=None,
        help="frames per stored chunk (default: the config's, 20 s); training reads across chunks",
    )
    parser.add_argument(
        "--memory_budget_gb",
        type=float,
        default=extract.DEFAULT_MEMORY_BUDGET_GB,
        help="bound on the workers' estimated memory; a longer track than it allows runs alone",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        summary = build_dataset(
            args.audio_dir,
            args.metadata_dir,
            args.data_dir,
            config_name=args.config,
            split_index=args.split,
            workers=args.workers,
            drop_duplicates=args.drop_duplicates,
            retry_failed=args.retry_failed,
            delete_cache=args.delete_cache,
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
            chunk_frames=args.chunk_frames,
            memory_budget_gb=args.memory_budget_gb,
            resample=args.resample,
        )
    except BuildError as error:
        sys.exit(f"error: {error}")
    print(summary)


if __name__ == "__main__":
    main()
