"""Organisers-style `.npy` mel-spectrograms of an audio tree in the MTG-Jamendo layout, so that the essentia96 path
(`python -m data_prep.build --features essentia96`) can be run where the organisers' files are out of reach:

    python -m data_prep.essentia_like --audio_dir SYNTH/audio --metadata_dir SYNTH/data --out SYNTH/npy

Writes OUT/NN/ID.npy, float32 (96, frames): the format of the organisers' precomputed features (12 kHz, frame 512,
hop 256, 96 mel bands, dB). The values are librosa's mel power in dB, not Essentia's own mel bands: the same shape,
rate and scale, not the same numbers (docs/fidelity.md, "Features"). Every track of the split-0 TSVs is written;
a file that exists is kept, so an interrupted run resumes. Each file is made in a worker process of
`worker_pool.run_all`: a file that cannot be read or decoded, hangs, or crashes its worker is named at the end
(`worker_pool.JobsFailed`) and does not stop the others.
"""

from __future__ import annotations

import functools
from pathlib import Path

import librosa
import numpy as np
import tqdm

from data_prep import extract, features, files, metadata, worker_pool

SETTINGS = features.settings_for("essentia96")


def essentia_like_mels(audio_file: str | Path) -> np.ndarray:
    """(96, frames) float32 dB mels of an audio file's mono mix, at the organisers' rate, frame and hop."""
    waveform, sample_rate = features.decode_audio(Path(audio_file).read_bytes(), str(audio_file))
    mono = librosa.resample(waveform.mean(axis=1), orig_sr=sample_rate, target_sr=SETTINGS.sample_rate)
    mels = librosa.feature.melspectrogram(
        y=mono, sr=SETTINGS.sample_rate, n_fft=SETTINGS.n_fft, hop_length=SETTINGS.hop_length, n_mels=SETTINGS.n_mels
    )
    return librosa.power_to_db(mels).astype(np.float32)


def _write(job: extract.TrackJob, audio_dir: Path, out_dir: Path) -> None:
    target = out_dir / features.source_path(job.path, SETTINGS)
    target.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(target, essentia_like_mels(audio_dir / job.path))


def write_essentia_like_tree(
    audio_dir: str | Path, metadata_dir: str | Path, out_dir: str | Path, workers: int = 1, progress: bool = True
) -> int:
    """Writes the `.npy` of every split-0 track not written yet; the number written. Raises worker_pool.JobsFailed,
    once the others are written, if some could not be."""
    audio_dir, out_dir = Path(audio_dir), Path(out_dir)
    tracks = [track for part in metadata.SPLIT_PARTS for track in metadata.read_split(metadata_dir, 0, part)]
    jobs = [
        extract.TrackJob(track.track_id, track.path, track.duration)
        for track in sorted(tracks, key=lambda track: track.path)
        if not (out_dir / features.source_path(track.path, SETTINGS)).is_file()
    ]
    with tqdm.tqdm(total=len(jobs), desc="essentia-like .npy", unit="track", disable=not progress) as bar:
        worker_pool.run_all(functools.partial(_write, audio_dir=audio_dir, out_dir=out_dir), jobs, workers, bar)
    return len(jobs)
