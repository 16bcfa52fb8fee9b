"""Organisers-style `.npy` mel-spectrograms of an audio tree in the MTG-Jamendo layout, so that the essentia96 path
(`python -m data_prep.build --features essentia96`) can be run where the organisers' files are out of reach:

    python -m data_prep.essentia_like --audio_dir SYNTH/audio --metadata_dir SYNTH/data --out SYNTH/npy

Writes OUT/NN/ID.npy, float32 (96, frames): the format of the organisers' precomputed features (12 kHz, frame 512,
hop 256, 96 mel bands, dB). The values are librosa's mel power in dB, not Essentia's own mel bands: the same shape,
rate and scale, not the same numbers (docs/fidelity.md, "Features"). Every track of the split-0 TSVs is written;
a file that exists is kept, so an interrupted run resumes.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from pathlib import Path

import librosa
import numpy as np
import tqdm

from data_prep import extract, features, metadata

SETTINGS = features.settings_for("essentia96")


def essentia_like_mels(audio_file: str | Path) -> np.ndarray:
    """(96, frames) float32 dB mels of an audio file's mono mix, at the organisers' rate, frame and hop."""
    waveform, sample_rate = features.decode_audio(Path(audio_file).read_bytes(), str(audio_file))
    mono = librosa.resample(waveform.mean(axis=1), orig_sr=sample_rate, target_sr=SETTINGS.sample_rate)
    mels = librosa.feature.melspectrogram(
        y=mono, sr=SETTINGS.sample_rate, n_fft=SETTINGS.n_fft, hop_length=SETTINGS.hop_length, n_mels=SETTINGS.n_mels
    )
    return librosa.power_to_db(mels).astype(np.float32)


def _write(audio_file: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    extract.write_atomically(target, essentia_like_mels(audio_file))


def write_essentia_like_tree(
    audio_dir: str | Path, metadata_dir: str | Path, out_dir: str | Path, workers: int = 1, progress: bool = True
) -> int:
    """Writes the `.npy` of every split-0 track not written yet; the number written."""
    audio_dir, out_dir = Path(audio_dir), Path(out_dir)
    tracks = [track for part in metadata.SPLIT_PARTS for track in metadata.read_split(metadata_dir, 0, part)]
    paths = sorted({track.path for track in tracks})
    jobs = [(audio_dir / path, out_dir / features.source_path(path, SETTINGS)) for path in paths]
    jobs = [(audio, target) for audio, target in jobs if not target.is_file()]
    bar = tqdm.tqdm(total=len(jobs), desc="essentia-like .npy", unit="track", disable=not progress)
    if workers <= 1:
        for job in jobs:
            _write(*job)
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")  # safe in a multi-threaded parent (JAX, TF)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for future in concurrent.futures.as_completed([pool.submit(_write, *job) for job in jobs]):
                future.result()
                bar.update()
    bar.close()
    return len(jobs)
