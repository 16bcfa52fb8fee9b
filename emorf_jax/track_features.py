"""A track's features as data preparation computes and stores them, from an audio file or a waveform: the part of
tagging that needs no JAX, so that the bulk tagger's feature processes (`emorf_jax.bulk_tagging`) import only this
module and data preparation's feature code, not the model side.
"""

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import features
from data_prep.reader import STORED_DTYPE, time_major


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
    """`waveform_features` of an audio file; an unreadable file raises OSError or features.AudioError, naming it."""
    waveform, sample_rate = features.decode_audio(Path(path).read_bytes(), str(path))
    return waveform_features(waveform, sample_rate, str(path), settings)


def stored(spectrogram: np.ndarray) -> np.ndarray:
    """Features as the shards store them, what the model steps read: float16, time-major (frames, ...)."""
    return time_major(np.asarray(spectrogram).astype(STORED_DTYPE))


def stored_file_features(path: str, settings: features.FeatureSettings) -> np.ndarray:
    """`stored(file_features(path))`: the work of one feature process, whose result is half the bytes of float32
    to send back and needs no conversion in the process that runs the model."""
    return stored(file_features(path, settings))


def exit_with_parent(parent: int) -> None:
    """Ends this (feature) process within a second of its parent `parent` dying: a run killed with SIGKILL would
    otherwise leave its feature processes waiting on their task queue for ever."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
