"""Real-time factor of tagging whole MP3 tracks, decoding included, with one model and a five-model ensemble.

    python -m benchmarks.predict                 # a 4-min MP3, the paper's FA-ResNet (ρ=5, width 128, 56 tags)
    python -m benchmarks.predict --quick         # tiny sizes, for CI: the script cannot rot

Writes a synthetic stereo MP3 (`data_prep.synthetic`'s melody and percussion, 44.1 kHz), then times, as
`emorf_jax.predict` tags a file: decoding (libsndfile), features (data preparation's own code, hop512) and the
models over the track's 20-s evaluation windows (`emorf_jax.tagger`, windows in batches of 8, the last one padded
to a power of two), for 1 and for `--models` randomly initialised models (weights do not change the cost). The
batch shapes the track runs in are compiled before timing, reported apart (with one run of those windows), as are
the features' one-off costs of a first call. Prints seconds per stage and the real-time factor (audio seconds per
wall second).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.tagging_inputs import NUM_TAGS, write_track
from data_prep import features
from emorf_jax import windowing
from emorf_jax.models import CPResNet
from emorf_jax.tagger import Member, Tagger


def random_tagger(count: int, base_channels: int, window_frames: int) -> Tagger:
    """`count` randomly initialised members: weights do not change the cost."""
    settings = features.settings_for("hop512")
    meta = {
        "tags": [f"mood/theme---tag{k}" for k in range(NUM_TAGS)],
        "features": dataclasses.asdict(settings),
        "normalisation": {"mean": [0.0] * settings.n_mels, "std": [20.0] * settings.n_mels},
        "window_frames": window_frames,
    }
    model = CPResNet(num_classes=NUM_TAGS, rho=5, base_channels=base_channels, frequency_aware=True)
    shape = (1, settings.n_mels, window_frames, 1)
    return Tagger(
        tuple(
            Member(model, model.init(jax.random.PRNGKey(seed), np.zeros(shape, np.float32)), meta)
            for seed in range(count)
        )
    )


def measure(path: Path, tagger: Tagger) -> dict:
    data = path.read_bytes()
    settings = features.FeatureSettings(**tagger.meta["features"])
    features.waveform_features(
        np.zeros((settings.sample_rate, 2), np.float32), settings.sample_rate, "warm-up", settings
    )  # the first call's one-off costs (filter banks, imports) are not timed
    start = time.perf_counter()
    waveform, sample_rate = features.decode_audio(data, str(path))
    decoded = time.perf_counter()
    spectrogram = features.waveform_features(waveform, sample_rate, str(path), settings)
    featured = time.perf_counter()
    seconds = waveform.shape[0] / sample_rate
    window, batch = tagger.window_frames, tagger.batch_size
    windows = len(windowing.window_ranges(spectrogram.shape[1], window))
    one_model = dataclasses.replace(tagger, members=tagger.members[:1])
    compile_start = time.perf_counter()
    for group in {min(windows, batch), windows % batch or batch}:  # compiles the batch shapes the track runs in
        one_model.tag_spectrogram(spectrogram[:, : group * window])
    compile_seconds = time.perf_counter() - compile_start
    figures = {
        "audio_seconds": round(seconds, 1),
        "file_bytes": len(data),
        "windows": windows,
        "decode_seconds": round(decoded - start, 3),
        "features_seconds": round(featured - decoded, 3),
        "compile_seconds": round(compile_seconds, 2),
        "cores": len(os.sched_getaffinity(0)),
    }
    for count in sorted({1, len(tagger.members)}):
        first_members = dataclasses.replace(tagger, members=tagger.members[:count])
        model_start = time.perf_counter()
        first_members.tag_spectrogram(spectrogram)
        model_seconds = time.perf_counter() - model_start
        total = featured - start + model_seconds
        figures[f"{count}_models"] = {
            "model_seconds": round(model_seconds, 3),
            "total_seconds": round(total, 3),
            "real_time_factor": round(seconds / total, 1),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=240.0, help="length of the track")
    parser.add_argument("--models", type=int, default=5, help="ensemble size")
    parser.add_argument("--base_channels", type=int, default=128)
    parser.add_argument("--window_frames", type=int, default=1722, help="the 20-s evaluation window")
    parser.add_argument("--out", default="/tmp/bench_predict", help="where the MP3 is written")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.models, args.base_channels, args.window_frames = 6.0, 2, 4, 172
    path = Path(args.out) / f"track_{args.seconds:g}s.mp3"
    if not path.exists():
        write_track(path, args.seconds)
    figures = measure(path, random_tagger(args.models, args.base_channels, args.window_frames))
    figures["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
