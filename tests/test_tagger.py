"""`emorf_jax.tagger` on real checkpoints: averages of several, audio files against their decoded waveforms, the
compatibility check, and the few batch shapes that every track length runs in."""

import os
import re
import shutil

import numpy as np
import pytest
import soundfile
from scipy.special import expit

from data_prep import features, metadata
from emorf_jax import checkpoints, tagger, thresholds


@pytest.fixture(scope="module")
def track_audio(synthetic_tree) -> tuple[np.ndarray, int]:
    """A test track's decoded (samples, 2) waveform and its sample rate."""
    track = metadata.read_split(synthetic_tree / "data", 0, "test")[0]
    return soundfile.read(synthetic_tree / "audio" / track.path, dtype="float32")


def test_several_checkpoints_average_the_probabilities_of_each_alone(random_checkpoints, track_audio):
    both = tagger.load_tagger(random_checkpoints)
    alone = [tagger.load_tagger(path) for path in random_checkpoints]
    spectrogram = both.spectrogram(*track_audio)
    averaged = both.tag_spectrogram(spectrogram)
    each = [one.tag_spectrogram(spectrogram) for one in alone]
    np.testing.assert_array_equal(averaged.probabilities, np.mean([t.probabilities for t in each], axis=0))
    np.testing.assert_array_equal(
        averaged.window_probabilities, np.mean([t.window_probabilities for t in each], axis=0)
    )
    assert averaged.windows == each[0].windows and len(averaged.windows) > 1
    assert not np.allclose(each[0].probabilities, each[1].probabilities)  # two different models
    # A track's probabilities are the sigmoid of its window logits averaged by the frames each window adds.
    logits, windows = alone[0].window_logits(spectrogram)
    weights = np.array([weight for _, _, weight in windows], np.float64)
    np.testing.assert_array_equal(each[0].probabilities, expit((logits[0] * weights[:, None]).sum(0) / weights.sum()))
    np.testing.assert_array_equal(each[0].window_probabilities, expit(logits[0]))


def test_a_file_is_tagged_as_its_decoded_waveform(random_checkpoints, track_audio, tmp_path):
    model = tagger.load_tagger(random_checkpoints)
    waveform, sample_rate = track_audio
    path = tmp_path / "song.flac"
    soundfile.write(path, waveform, sample_rate)
    decoded, decoded_rate = features.decode_audio(path.read_bytes(), str(path))
    from_file = model.tag_file(path)
    assert model.tag_audio(decoded, decoded_rate) == dict(zip(model.tags, from_file.probabilities.tolist()))
    assert from_file.window_probabilities.shape == (len(from_file.windows), len(model.tags))
    (tmp_path / "notes.mp3").write_text("not audio")
    with pytest.raises(features.AudioError, match="notes.mp3"):
        model.tag_file(tmp_path / "notes.mp3")


def test_checkpoints_of_other_tags_or_normalisation_are_refused_naming_them(random_checkpoints, tmp_path):
    variables, meta = checkpoints.load_checkpoint(random_checkpoints[0])
    for key, other in [("tags", [*meta["tags"][:-1], "genre---other"]), ("normalisation", {"mean": 0, "std": 1})]:
        with checkpoints.open_manager(str(tmp_path / key), checkpoints.SWA) as manager:
            checkpoints.save(manager, 1, variables, {**meta, key: other})
        path = str(tmp_path / key / checkpoints.SWA)
        with pytest.raises(ValueError, match=re.escape(f"{path} has other {key} than {random_checkpoints[1]}")):
            tagger.load_tagger([random_checkpoints[1], path])
    with pytest.raises(ValueError, match="no checkpoint"):
        tagger.load_tagger([])


def test_tracks_of_any_length_run_in_a_few_batch_shapes_without_recompiling(random_checkpoints, track_audio):
    """Batches of 4 windows and a last one padded to 1, 2 or 4: three compiled shapes for every track length."""
    model = tagger.load_tagger(random_checkpoints[0], batch_size=4, backend="jax")
    settings = features.FeatureSettings(**model.meta["features"])
    waveform, rate = track_audio
    long = features.waveform_features(np.tile(waveform, (20, 1)), rate, "long", settings)
    compiled = tagger._jitted_window_outputs._cache_size()
    for windows in range(1, 10):  # last groups of 1, 2, 3 and 4 windows
        model.tag_spectrogram(long[:, : windows * model.window_frames])
    assert tagger._jitted_window_outputs._cache_size() <= compiled + 3
    compiled = tagger._jitted_window_outputs._cache_size()
    logits, windows = model.window_logits(long)
    assert tagger._jitted_window_outputs._cache_size() == compiled  # whatever the length
    assert logits.shape == (1, len(windows), len(model.tags)) and len(windows) > 4 * model.batch_size
    assert sum(weight for _, _, weight in windows) == long.shape[1]
    assert [tagger.padded_batch_size(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert tagger.padded_batch_size(5, 6) == 6


def test_thresholds_added_to_a_saved_checkpoint_are_read_back_and_shown_by_its_model_card(random_checkpoints, tmp_path):
    copy = shutil.copytree(random_checkpoints[0], tmp_path / "swa")
    tags = checkpoints.load_checkpoint(str(copy))[1]["tags"]
    with pytest.raises(ValueError, match="holds no decision thresholds"):  # a checkpoint saved without them
        thresholds.read(str(copy))
    assert "thresholds       none stored" in tagger.model_card(str(copy)).splitlines()
    values = [0.25 + 0.01 * index for index in range(len(tags) - 1)] + [float("inf")]  # inf: no positive track
    thresholds.write(str(copy), tags, values)
    step = checkpoints.step_directory(str(copy))
    for path in (str(copy), step):
        read_tags, read_values = thresholds.read(path)
        assert read_tags == tags and read_values.tolist() == values
    assert sorted(os.listdir(os.path.join(step, "meta"))) == ["commit_success.txt", "metadata"]  # no temporary left
    variables, meta = checkpoints.load_checkpoint(step)  # orbax still restores it, the thresholds in its meta
    assert meta[checkpoints.THRESHOLDS] == values and meta["tags"] == tags
    assert "thresholds       per tag, from validation" in tagger.model_card(str(copy)).splitlines()
    thresholds.write(str(copy), tags, [0.5] * len(tags))  # replaced, not appended
    assert thresholds.read(str(copy))[1].tolist() == [0.5] * len(tags)
    with pytest.raises(ValueError, match=f"thresholds for 2 tags that are not the {len(tags)} tags of"):
        thresholds.write(str(copy), tags[:2], [0.5, 0.5])


def test_int8_calibration_takes_a_few_windows_per_file_and_passes_over_unreadable_ones(
    random_checkpoints, synthetic_tree, tmp_path
):
    pytest.importorskip("onnxruntime", reason="int8 tagging needs onnxruntime (pip install -e .)")
    model = tagger.load_tagger(random_checkpoints[0])
    tracks = metadata.read_split(synthetic_tree / "data", 0, "train")
    longest = max(tracks, key=lambda track: track.duration)  # the tree's long track: several windows
    broken = tmp_path / "broken.mp3"
    broken.write_bytes(b"not audio at all")
    files = [str(broken), str(synthetic_tree / "audio" / longest.path)]
    settings, window = model.feature_settings, model.window_frames
    stored = model.read_features(files[1])
    assert len(stored.shape) == 2 and stored.shape[1] > 3 * window  # at least four windows in the long track
    windows = tagger.calibration_windows(files, settings, window, count=10, per_file=3)
    assert len(windows) == 3 and all(w.shape == (window, settings.n_mels) for w in windows)
    np.testing.assert_array_equal(windows[1], model.read_features(files[1]).T[window : 2 * window].astype(np.float16))
    assert len(tagger.calibration_windows(files, settings, window, count=2, per_file=3)) == 2
    with pytest.raises(ValueError, match="none of the calibration files could be read") as error:
        tagger.calibration_windows([str(broken)], settings, window)
    assert "broken.mp3" in str(error.value)
    key = tagger.files_key(files)
    assert tagger.files_key(files) == key and tagger.files_key(files[1:]) != key
    broken.write_bytes(b"not audio, and longer")  # another size: another key
    assert tagger.files_key(files) != key


def test_int8_tagging_is_close_to_float_and_only_with_onnxruntime(random_checkpoints, synthetic_tree):
    pytest.importorskip("onnxruntime", reason="int8 tagging needs onnxruntime (pip install -e .)")
    with pytest.raises(ValueError, match="only the onnxruntime backend"):
        tagger.load_tagger(random_checkpoints[0], backend="jax", precision="int8")
    with pytest.raises(ValueError, match="precision 'int4'"):
        tagger.load_tagger(random_checkpoints[0], backend="onnxruntime", precision="int4")
    files = [str(synthetic_tree / "audio" / t.path) for t in metadata.read_split(synthetic_tree / "data", 0, "test")]
    exact = tagger.load_tagger(random_checkpoints[0])  # on a CPU the default backend is onnxruntime
    assert exact.members[0].session is not None and exact.batch_size == 2
    int8 = tagger.load_tagger(random_checkpoints[0], precision="int8", calibration_files=files)
    for path in files[:3]:
        expected, tags = exact.tag_file(path).probabilities, int8.tag_file(path).probabilities
        assert np.abs(tags - expected).max() < 0.05 and not np.array_equal(tags, expected)
