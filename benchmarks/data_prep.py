"""Real-time factor per core and peak memory of the whole data-preparation step.

    python -m benchmarks.data_prep --tracks 24 --duration 120 --workers 2 --out /tmp/bench_data_prep
    python -m benchmarks.data_prep --quick      # tiny sizes, for CI: the script cannot rot

Builds a synthetic tree (real 320 kbit/s stereo MP3s, not timed), then times ``build_dataset`` end to end
(worker start, decode, features, cache, normalisation stats, TFRecord shards; TensorFlow's import, a
fixed cost of a few seconds per run, is timed apart) on the MP3s (``hop512``) and
on ``.npy`` mel-spectrograms of the same lengths (``essentia96``; their values are random, which does not
change the cost). Real-time factor per core = audio seconds / (wall seconds * workers); on a machine that
other jobs share, audio seconds per CPU second (all processes) says what an idle machine would give, and the load
average before and after each build says how shared it was. Stage 1 (worker start, hashing, decoding, features,
float16 cache) is timed apart from the rest (normalisation statistics, TFRecord shards, reports). Peak memory is
sampled from /proc every 0.5 s (`PEAK_MEMORY_INTERVAL_S`): the whole process tree's PSS, and the largest single
worker's PSS. Decode alone and features alone are timed in this process, on one thread, as reference points, and
so is the CPU that a fresh worker's imports cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import threadpoolctl

from data_prep import extract, features, metadata, preparation, synthetic


def _pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages split among their users, so that a sum over processes is right
    (a fresh fork's RSS would count its parent's pages twice)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return pids


# Reading a process's PSS walks its page tables: every 50 ms, this parent's (which holds TensorFlow) and two
# workers' took 0.3 s of CPU per second, a third of a core taken from the workers being timed; every 0.5 s, 0.05 s
# per second. A worker's peak (its largest track's buffered spectra) lasts longer than 0.5 s.
PEAK_MEMORY_INTERVAL_S = 0.5


class PeakMemory:
    """Samples the PSS of this process and its descendants in a thread until stopped."""

    def __init__(self, root_pid: int, interval_s: float = PEAK_MEMORY_INTERVAL_S) -> None:
        self.root_pid, self.interval_s = root_pid, interval_s
        self.peak_total = self.peak_worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            descendants, frontier = [], [self.root_pid]
            while frontier:
                children = _children(frontier.pop())
                descendants += children
                frontier += children
            worker_pss = [_pss_bytes(pid) for pid in descendants]
            self.peak_total = max(self.peak_total, _pss_bytes(self.root_pid) + sum(worker_pss))
            self.peak_worker = max([self.peak_worker, *worker_pss])
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds(times: os.times_result) -> float:
    """CPU time of this process and its reaped descendants (the workers, once their pool has closed)."""
    return times.user + times.system + times.children_user + times.children_system


def _split_tracks(tree: Path) -> list[metadata.Track]:
    return [track for part in metadata.SPLIT_PARTS for track in metadata.read_split(tree / "data", 0, part)]


def _write_npy_inputs(tree: Path, out: Path) -> None:
    settings = features.settings_for("essentia96")
    rng = np.random.default_rng(0)
    for track in _split_tracks(tree):
        frames = 1 + int(track.duration * settings.sample_rate) // settings.hop_length
        target = out / features.source_path(track.path, settings)
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, rng.normal(-40, 15, size=(settings.n_mels, frames)).astype(np.float32))


@contextlib.contextmanager
def _stage_one_timed(walls: list[float]) -> Iterator[None]:
    """Appends the wall time of each stage 1 (`extract.extract_all`) that the build runs inside the block."""
    extract_all = extract.extract_all

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return extract_all(*args, **kwargs)
        finally:
            walls.append(time.perf_counter() - start)

    extract.extract_all = timed
    try:
        yield
    finally:
        extract.extract_all = extract_all


def _timed_build(input_dir: Path, tree: Path, data_dir: Path, feature_setting: str, workers: int) -> dict:
    audio_seconds = sum(track.duration for track in _split_tracks(tree))
    load_before = os.getloadavg()[0]
    cpu_before = os.times()
    stage_one: list[float] = []
    with PeakMemory(os.getpid()) as memory, _stage_one_timed(stage_one):
        start = time.perf_counter()
        options = preparation.BuildOptions(
            input_dir, tree / "data", data_dir, features=feature_setting, workers=workers, progress=False
        )
        summary = preparation.build_dataset(options)
        wall = time.perf_counter() - start
    cpu = _cpu_seconds(os.times()) - _cpu_seconds(cpu_before)
    assert not summary.failures, summary
    return {
        "features": feature_setting,
        "tracks": sum(summary.tracks.values()),
        "audio_seconds": round(audio_seconds, 1),
        "wall_seconds": round(wall, 2),
        "stage1_wall_seconds": round(sum(stage_one), 2),
        "after_stage1_wall_seconds": round(wall - sum(stage_one), 2),
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "workers": workers,
        "rtf_per_core": round(audio_seconds / (wall * workers), 1),
        "cpu_seconds": round(cpu, 2),
        "rtf_per_cpu_second": round(audio_seconds / cpu, 1),
        "peak_pss_total_mib": round(memory.peak_total / 2**20),
        "peak_pss_worker_mib": round(memory.peak_worker / 2**20),
    }


def _single_thread_reference(tree: Path, max_tracks: int = 4) -> dict:
    """Decode alone, features alone and librosa's pipeline, one thread, in this process: where the time goes."""
    tracks = _split_tracks(tree)[:max_tracks]
    data = [(tree / "audio" / track.path).read_bytes() for track in tracks]
    seconds = sum(track.duration for track in tracks)
    settings = features.settings_for("hop512")
    with threadpoolctl.threadpool_limits(limits=1):
        features.audio_features(data[0], "warm-up", settings)
        start = time.perf_counter()
        decoded = [features.decode_audio(blob, "track") for blob in data]
        decode = time.perf_counter() - start
        start = time.perf_counter()
        for waveform, sample_rate in decoded:
            features.spectrogram(waveform, sample_rate)
        spectrogram = time.perf_counter() - start
        _librosa_pipeline(tree / "audio" / tracks[0].path)  # warm-up: librosa compiles and caches on first use
        start = time.perf_counter()
        for track in tracks:
            _librosa_pipeline(tree / "audio" / track.path)
        reference = time.perf_counter() - start
    return {
        "decode_rtf": round(seconds / decode, 1),
        "features_rtf": round(seconds / spectrogram, 1),
        "librosa_pipeline_rtf": round(seconds / reference, 1),
    }


def _worker_start_cpu_seconds() -> float:
    """CPU seconds of a fresh interpreter that imports what an extraction worker imports and computes one short
    spectrogram (its filterbank built): the start-up cost of each worker."""
    code = (
        "import numpy, threadpoolctl; from data_prep import extract, features, worker_pool; "
        "features.spectrogram(numpy.ones(4096, numpy.float32), 44100)"
    )
    before = os.times()
    subprocess.run([sys.executable, "-c", code], check=True)
    after = os.times()
    return after.children_user + after.children_system - before.children_user - before.children_system


def _librosa_pipeline(path: Path) -> np.ndarray:
    """The straightforward way, for comparison: librosa.load, then librosa's functions step by step."""
    import librosa

    waveform, sample_rate = librosa.load(path, sr=44100, mono=True)
    magnitude = np.abs(librosa.stft(waveform, n_fft=2048, hop_length=512, pad_mode="reflect"))
    frequencies = librosa.fft_frequencies(sr=sample_rate, n_fft=2048)
    with np.errstate(divide="ignore"):
        weighted = librosa.perceptual_weighting(magnitude**2, frequencies, ref=1.0, amin=1e-10, top_db=80)
    return librosa.feature.melspectrogram(S=weighted, sr=sample_rate, n_mels=256)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.data_prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tracks", type=int, default=24, help="tracks in the synthetic tree")
    parser.add_argument("--duration", type=float, default=120.0, help="typical track length in seconds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="work dir; its synthetic tree is reused between runs")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for CI")
    args = parser.parse_args(argv)
    if args.quick:
        args.tracks, args.duration = 10, 3.0

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_data_prep_"))
    tree = out / "tree"
    if not (tree / "data").exists():
        synthetic.make_synthetic(
            tree, num_tracks=args.tracks, seed=0, duration=args.duration, long_tracks=0, duplicate_groups=0
        )
    if not (out / "npy").exists():
        _write_npy_inputs(tree, out / "npy")
    for stale in ("built_mp3", "built_npy"):
        shutil.rmtree(out / stale, ignore_errors=True)

    start = time.perf_counter()
    import data_prep.shard_writer  # noqa: F401  (TensorFlow: a fixed start-up cost, reported apart)

    results = {
        "tensorflow_import_seconds": round(time.perf_counter() - start, 1),
        "mp3": _timed_build(tree / "audio", tree, out / "built_mp3", "hop512", args.workers),
        "npy": _timed_build(out / "npy", tree, out / "built_npy", "essentia96", args.workers),
        "single_thread": _single_thread_reference(tree),
        "worker_start_cpu_seconds": round(_worker_start_cpu_seconds(), 2),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
