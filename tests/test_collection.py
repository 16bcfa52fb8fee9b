"""A user's own labelled collection: the CSV read and checked, its seeded artist-disjoint split, its tags chosen and
reported, its build (a missing file in failures.tsv), bad files named by file and line, and a model trained on its
tags that is scored and tags music with them."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep import build, collection, extract, metadata, preparation, synthetic
from data_prep.reader import PARTS, load_prepared
from tests.process_output import stderr_excerpt

from .conftest import CHUNK_FRAMES

REPO = Path(__file__).resolve().parents[1]
MISSING = "missing/song.mp3"
HEADER = ["path", "tags", "split", "artist"]


def _write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _synthetic_rows(tree: Path) -> list[list[str]]:
    """path, tags, split, artist of every track of the synthetic tree's split, its tags without their category."""
    return [
        [track.path, ";".join(metadata.short_tag_name(tag) for tag in track.tags), part, track.artist_id]
        for part in PARTS
        for track in metadata.read_split(tree / "data", 0, part)
    ]


def _report_counts(report: str) -> dict[str, list[int]]:
    """Each tag's tracks per part, as the printed report's tables give them."""
    counts = {}
    for line in report.splitlines():
        fields = line.split()
        if line.startswith("  ") and len(fields) == 4 and all(field.isdigit() for field in fields[1:]):
            counts[fields[0]] = [int(field) for field in fields[1:]]
    return counts


def _counts(rows: list[list[str]]) -> dict[str, list[int]]:
    """Each tag's tracks per part of rows with a split column."""
    tags = sorted({tag for row in rows for tag in row[1].split(";")})
    return {tag: [sum(tag in row[1].split(";") and row[2] == part for row in rows) for part in PARTS] for tag in tags}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def collection_build(synthetic_tree, tmp_path_factory) -> tuple[Path, Path, list[list[str]], str]:
    """The session tree's MP3s as a collection with split and artist columns and a row whose file is missing, built
    by the command as a user types it: (CSV, data dir, rows, printed output)."""
    root = tmp_path_factory.mktemp("collection")
    rows = _synthetic_rows(synthetic_tree)
    kept_tag = next(tag for tag, per_part in _counts(rows).items() if min(per_part) >= 1)
    rows.append([MISSING, kept_tag, "train", "nobody"])
    tags_csv = _write_csv(root / "tags.csv", HEADER, rows)
    command = [sys.executable, "-m", "data_prep.build", f"--tags_csv={tags_csv}"]
    command += ["--audio_dir", str(synthetic_tree / "audio"), "--data_dir", str(root / "data")]
    command += ["--workers", "2", "--no_progress", "--chunk_frames", str(CHUNK_FRAMES)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, stderr_excerpt(result.stderr)
    return tags_csv, root / "data", rows, result.stdout


def test_a_collection_with_split_and_artist_columns_is_built_with_its_own_tags(collection_build):
    _, data_dir, rows, output = collection_build
    expected = _counts(rows)
    kept = tuple(tag for tag, per_part in expected.items() if min(per_part) >= 1)
    assert "split from its split column" in output and set(kept) < set(expected)
    assert _report_counts(output) == expected  # every tag's tracks per part, the kept and the left out
    assert all(f"  {tag} " in output.split("left out")[1] for tag in set(expected) - set(kept))
    prepared = load_prepared(data_dir)
    assert prepared.tags == kept and f"tags: {len(kept)} (a collection's)" in output
    (failure,) = prepared.failure_records
    assert (failure["track_id"], failure["part"], failure["path"], failure["kind"]) == (
        collection.track_id_for(MISSING),
        "train",
        MISSING,
        "missing",
    )
    assert "missing: 1" in output
    written = collection.metadata_dir(data_dir)
    for part in PARTS:
        tracks = metadata.read_split(written, 0, part, metadata.COLLECTION)
        in_part = [row for row in rows if row[2] == part and set(row[1].split(";")) & set(kept)]
        assert [track.path for track in tracks] == [row[0] for row in in_part]
        assert [set(track.tags) for track in tracks] == [set(row[1].split(";")) & set(kept) for row in in_part]
        assert all(track.artist_id == row[3] for track, row in zip(tracks, in_part))
        stored = [track for track in tracks if track.path != MISSING]
        assert list(prepared.track_ids[part]) == [track.track_id for track in stored]
        labels = np.array([metadata.track_labels(track, kept) for track in stored])
        np.testing.assert_array_equal(prepared.parts[part].labels, labels)
    groundtruth = np.load(written / "splits" / "split-0" / collection.GROUNDTRUTH_NAME)
    np.testing.assert_array_equal(groundtruth, metadata.split_labels(written, 0, "test", metadata.COLLECTION))


def test_a_collection_retagged_is_rebuilt_from_its_cached_features(collection_build, synthetic_tree, tmp_path, capsys):
    _, data_dir, rows, _ = collection_build
    shutil.copytree(data_dir, tmp_path / "data")
    journal = tmp_path / "data" / "cache" / "hop512" / extract.JOURNAL_NAME
    extracted = journal.read_text()
    tags = load_prepared(data_dir).tags
    number, first = next(
        (number, row)
        for number, row in enumerate(rows)
        if row[0] != MISSING and set(row[1].split(";")) & set(tags) and set(tags) - set(row[1].split(";"))
    )
    new_tag = next(tag for tag in tags if tag not in first[1].split(";"))
    retagged = [*rows[:number], [first[0], f"{first[1]};{new_tag}", *first[2:]], *rows[number + 1 :]]
    options = preparation.BuildOptions(
        synthetic_tree / "audio",
        None,
        tmp_path / "data",
        tags_csv=_write_csv(tmp_path / "retagged.csv", HEADER, retagged),
        workers=2,
        progress=False,
        chunk_frames=CHUNK_FRAMES,
    )
    preparation.build_dataset(options)
    assert "rebuilding" in capsys.readouterr().out
    prepared = load_prepared(tmp_path / "data")
    row = prepared.track_ids[first[2]].index(collection.track_id_for(first[0]))
    assert prepared.parts[first[2]].labels[row, prepared.tags.index(new_tag)]
    again = journal.read_text().removeprefix(extracted).splitlines()
    assert all(json.loads(line)["path"] == MISSING for line in again)  # looked for again; no features recomputed
    preparation.build_dataset(options)
    assert "already prepared" in capsys.readouterr().out


def _planned_rows(num_tracks: int = 300, seed: int = 4) -> list[list[str]]:
    """path, tags, artist of a synthetic MTG-Jamendo's tracks (no audio: the split needs none)."""
    return [
        [plan.path, ";".join(plan.tags), f"artist {plan.artist_number}"]
        for plan in synthetic.plan_tracks(num_tracks, seed, duration=3.0)
    ]


def test_without_a_split_column_the_split_is_seeded_artist_disjoint_and_spreads_each_tag(tmp_path):
    rows = _planned_rows()
    for row in rows[:2]:
        row[1] += ";polka"  # too rare for three parts
    tags_tsv = _write_csv(tmp_path / "tags.tsv", ["path", "tags", "artist"], rows, delimiter="\t")
    report = collection.write_metadata(tags_tsv, tmp_path / "audio", tmp_path / "a", seed=7)
    collection.write_metadata(tags_tsv, tmp_path / "audio", tmp_path / "b", seed=7)
    collection.write_metadata(tags_tsv, tmp_path / "audio", tmp_path / "c", seed=8)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    split_tsv = metadata.split_tsv_path(tmp_path, 0, "test", metadata.COLLECTION).relative_to(tmp_path)
    assert (tmp_path / "a" / split_tsv).read_bytes() != (tmp_path / "c" / split_tsv).read_bytes()
    assert "split made with seed 7, 80/10/10 %, artist-disjoint over" in str(report)

    parts = {part: metadata.read_split(tmp_path / "a", 0, part, metadata.COLLECTION) for part in PARTS}
    artists = [{track.artist_id for track in tracks} for tracks in parts.values()]
    assert not (artists[0] & artists[1] or artists[0] & artists[2] or artists[1] & artists[2])
    for tracks, fraction in zip(parts.values(), collection.DEFAULT_FRACTIONS):
        assert abs(len(tracks) / len(rows) - fraction) < 0.05
    assert "polka" in report.left_out and report.counts["polka"] != {part: 0 for part in PARTS}
    assert metadata.read_tag_list(tmp_path / "a", metadata.COLLECTION) == report.kept == tuple(sorted(report.kept))
    assert _report_counts(str(report)) == {tag: list(counts.values()) for tag, counts in report.counts.items()}
    for tag in report.kept:
        per_part = [sum(tag in track.tags for track in tracks) for tracks in parts.values()]
        assert per_part == list(report.counts[tag].values()) and min(per_part) >= 1
        if sum(per_part) >= 40:  # as the artists allow: each part's share of a common tag near the part's share
            shares = np.array(per_part) / sum(per_part)
            assert np.abs(shares - collection.DEFAULT_FRACTIONS).max() < 0.1, (tag, per_part)
    counts_file = (tmp_path / "a" / collection.TAG_COUNTS_NAME).read_text().splitlines()
    assert counts_file[0] == "tag\ttrain\tvalidation\ttest\tkept" and len(counts_file) == 1 + len(report.counts)

    kept_all = collection.write_metadata(tags_tsv, tmp_path / "audio", tmp_path / "d", seed=7, keep_rare_tags=True)
    assert "polka" in kept_all.kept and not kept_all.left_out
    stricter = collection.write_metadata(tags_tsv, tmp_path / "audio", tmp_path / "e", seed=7, min_tag_tracks=4)
    assert set(stricter.kept) == {tag for tag in report.counts if min(report.counts[tag].values()) >= 4}
    assert "fewer than 4 tracks in a part" in str(stricter)

    no_artists = _write_csv(tmp_path / "no_artists.csv", ["tags", "path"], [[row[1], row[0]] for row in rows])
    by_track = collection.write_metadata(no_artists, tmp_path / "audio", tmp_path / "f", fractions=(0.6, 0.2, 0.2))
    assert "60/20/20 %, no artist column: track by track" in str(by_track)
    assert [by_track.tracks[part] for part in PARTS] == pytest.approx([180, 60, 60], abs=6)


@pytest.mark.parametrize(
    "content, line, message",
    [
        ("", None, "empty; expected a header such as 'path,tags' and one row per audio file"),
        ("path,tags\n", None, "no rows after the header"),
        ("path,tags\r\na.mp3,happy\r\nb.mp3, ; \r\n", 3, "b.mp3 has no tags (give at least one, separated by ';')"),
        ("path,tags,split\na.mp3,happy,training\n", 2, "unknown split 'training' for a.mp3; expected one of train, "),
        ("path,tags,split\na.mp3,happy,test\nb.mp3,sad,\n", 3, "no split for b.mp3; with a split column every row "),
        ("path,tags\na.mp3,happy\nrock/../a.mp3,sad\n", 3, "a.mp3 is listed again (first on line 2)"),
        ("path,tags,genre\na.mp3,happy,rock\n", 1, "unknown column 'genre'; the columns are path and tags, and "),
        ("tags,split\nhappy,train\n", 1, "no path column in the header ['tags', 'split']"),
        ("path,tags\n/music/a.mp3,happy\n", 2, "/music/a.mp3 is absolute; give paths relative to the audio folder"),
        ("path,tags\nsong, live.mp3,happy\n", 2, "3 fields, the header names 2 (quote a field that holds the "),
    ],
)
def test_a_bad_collection_file_stops_the_build_with_one_line_naming_file_and_line(tmp_path, content, line, message):
    tags_csv = tmp_path / "tags.csv"
    tags_csv.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as stopped:
        build.main(["--tags_csv", str(tags_csv), "--audio_dir", str(tmp_path), "--data_dir", str(tmp_path / "data")])
    where = f"{tags_csv}:{line}" if line else str(tags_csv)
    assert stopped.value.code.startswith(f"error: {where}: {message}") and "\n" not in stopped.value.code
    assert not (tmp_path / "data").exists()


def test_collection_flags_are_checked_before_any_work(capsys, prepared_data_dir, tmp_path):
    common = ["--audio_dir", "A", "--data_dir", "D"]
    for wrong, message in (
        (["--tags_csv", "t.csv", "--metadata_dir", "M"], "give metadata_dir (MTG-Jamendo's data/ folder) or tags_csv"),
        ([], "give metadata_dir (MTG-Jamendo's data/ folder) or tags_csv"),
        (["--tags_csv", "t.csv", "--split_fractions", "0.5,0.5"], "split_fractions=(0.5, 0.5): expected three"),
        (["--tags_csv", "t.csv", "--subset", "genre"], "subset='genre' is an MTG-Jamendo subset"),
        (["--tags_csv", "t.csv", "--min_tag_tracks", "0"], "min_tag_tracks=0: need at least 1"),
    ):
        with pytest.raises(SystemExit):
            build.parse_options([*common, *wrong])
        assert message in capsys.readouterr().err
    options = build.parse_options([*common, "--tags_csv", "t.csv", "--split_fractions", "0.7,0.15,0.15"])
    assert (options.split_fractions, options.tag_subset, options.resamples) == ((0.7, 0.15, 0.15), "collection", True)
    options = build.parse_options([*common, "--metadata_dir", "M", "--subset", "top50tags"])
    assert (options.tag_subset, options.metadata_root, options.resamples) == ("top50tags", Path("M"), False)

    tags_csv = _write_csv(tmp_path / "tags.csv", ["path", "tags"], [["a.mp3", "happy"]])
    data_dir, _ = prepared_data_dir  # holds the synthetic MTG-Jamendo: a collection is refused there
    with pytest.raises(preparation.BuildError, match="holds MTG-Jamendo's moodtheme subset .*; prepare a collection"):
        preparation.build_dataset(preparation.BuildOptions(tmp_path, None, data_dir, tags_csv=tags_csv))
    assert not collection.metadata_dir(data_dir).exists()


def test_a_model_trained_on_a_collection_is_scored_tags_music_with_its_tags_and_exports(
    collection_build, synthetic_tree, tmp_path
):
    _, data_dir, rows, _ = collection_build
    workdir = tmp_path / "run"
    train = [sys.executable, "-m", "emorf_jax.main", "--config=configs/faresnet.py:test"]
    train += [f"--config.dataset.data_dir={data_dir}", f"--workdir={workdir}"]
    trained = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, stderr_excerpt(trained.stderr)
    tags = load_prepared(data_dir).tags
    swa = workdir / "report" / "swa"
    assert np.load(swa / "test_predictions.npy").shape[1] == len(tags)

    groundtruth = collection.metadata_dir(data_dir) / "splits" / "split-0" / collection.GROUNDTRUTH_NAME
    evaluate = [sys.executable, "-m", "emorf_jax.evaluate", "--groundtruth", str(groundtruth), "--json"]
    evaluate += [
        "--predictions",
        str(swa / "submission" / "predictions.npy"),
        "--thresholds",
        str(swa / "thresholds.tsv"),
    ]
    evaluated = subprocess.run(evaluate, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    figures = json.loads(evaluated.stdout)
    assert figures["PR-AUC-macro"] == pytest.approx(json.loads((swa / "metrics.json").read_text())["PR-AUC-macro"])

    audio = synthetic_tree / "audio"
    test_file = next(row[0] for row in rows if row[2] == "test")
    output = tmp_path / "tags.csv"
    predict = [sys.executable, "-m", "emorf_jax.predict", str(audio / test_file), f"--checkpoint={workdir / 'swa'}"]
    predict += [f"--output={output}", "--decisions"]
    tagged = subprocess.run(predict, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert tagged.returncode == 0, tagged.stderr
    header, row = list(csv.reader(output.open()))
    assert set(tags) <= set(header) and row[0] == str(audio / test_file)

    export = [sys.executable, "-m", "emorf_jax.export", f"--checkpoint={workdir / 'swa'}", "--format=torch"]
    exported = subprocess.run(
        [*export, f"--output={tmp_path / 'model.pth'}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "model.json").read_text())["tags"] == list(tags)
