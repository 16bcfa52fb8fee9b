"""A track's features as data preparation computes and stores them, from an audio file or a waveform: the part of
tagging that needs no JAX, so that the bulk tagger's feature processes (`feature_worker`, which `emorf_jax.predict`
starts) import only this module and data preparation's feature code, not the model side.
"""

import os
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import features
from data_prep.reader import stored_frames


def audio_settings(fields: dict[str, Any]) -> features.FeatureSettings:
    """A checkpoint meta's feature setting; ValueError if the model was not trained on audio."""
    settings = features.FeatureSettings(**fields)
    if settings.source != "audio":
        raise ValueError(
            f"this model was trained on {settings.source!r} input, not audio: pass that input to tag_spectrogram"
        )
    return settings


def waveform_features(
    waveform: np.ndarray, sample_rate: int, name: str, settings: features.FeatureSettings
) -> np.ndarray:
    """float32 features of a decoded (samples, channels) waveform at any rate and channel count, resampled and mixed
    down as `features.waveform_features` does."""
    return features.waveform_features(waveform, sample_rate, name, settings, resample=True)


def file_features(path: str | Path, settings: features.FeatureSettings) -> np.ndarray:
    """`waveform_features` of an audio file (`file_blocks` put together); an unreadable file raises OSError or
    features.AudioError, naming it."""
    return np.concatenate(list(file_blocks(path, settings)), axis=-1)


def file_blocks(path: str | Path, settings: features.FeatureSettings) -> Iterator[np.ndarray]:
    """The features of an audio file in blocks of frames, resampled and mixed down as `waveform_features`, computed
    in memory that does not grow with the track's length (`features.FileFeatures`)."""
    return features.file_feature_blocks(path, str(path), settings, resample=True)


def stored(spectrogram: np.ndarray) -> np.ndarray:
    """Features as the shards store them, what the model steps read: float16, time-major (frames, ...)."""
    return stored_frames(np.asarray(spectrogram))


def stored_file_features(path: str, settings: features.FeatureSettings) -> np.ndarray:
    """`stored(file_features(path))`: a track's features as the model steps read them."""
    return stored(file_features(path, settings))


def stored_file_blocks(path: str, settings: features.FeatureSettings) -> Iterator[np.ndarray]:
    """`file_blocks` in the stored format (`stored`): blocks of (frames, ...) float16."""
    for block in file_blocks(path, settings):
        yield stored(block)


def failure_reason(error: BaseException) -> str:
    """What went wrong with a file, in one line: an OSError's own words, a ValueError's message (features.AudioError
    names the file), or the exception's type and message."""
    if isinstance(error, OSError) and error.strerror:
        reason = f"cannot read: {error.strerror}"
    elif isinstance(error, (OSError, ValueError)):
        reason = str(error)
    else:
        reason = f"{type(error).__name__}: {error}"
    return " ".join(reason.splitlines())


def feature_worker(connection: Connection, settings: features.FeatureSettings, parent: int) -> None:
    """A feature process of bulk tagging (`emorf_jax.predict`): for each path it receives, until None or its
    parent's end of the pipe closes, it sends ("duration", seconds the header announces) once the file is open,
    ("frames", stored block) for each block of features as it is computed, then ("done", None), or ("error", reason)
    when the file fails. A send blocks while the parent does not read (it is busy with an earlier file), so a long
    track waits in a few blocks, not in memory. One BLAS/FFT thread (the model runs on every core); it ends within a
    second of its parent's death (`exit_with_parent`)."""
    import threadpoolctl  # scikit-learn's dependency, in the plain install

    exit_with_parent(parent)
    threadpoolctl.threadpool_limits(limits=1)
    while True:
        try:
            path = connection.recv()
        except (EOFError, OSError):
            return
        if path is None:
            return
        try:
            with features.AudioFile(path, path) as audio:
                connection.send(("duration", audio.duration))
                for block in features.FileFeatures(audio, settings, resample=True).blocks():
                    connection.send(("frames", stored(block)))
            message = ("done", None)
        except Exception as error:  # any failure of one file is that file's row
            message = ("error", failure_reason(error))
        try:
            connection.send(message)
        except OSError:  # the parent has gone
            return


def exit_with_parent(parent: int) -> None:
    """Ends this (feature) process within a second of its parent `parent` dying: a run killed with SIGKILL would
    otherwise leave its feature processes waiting on their task queue for ever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
