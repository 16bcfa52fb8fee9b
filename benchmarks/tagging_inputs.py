"""What the tagging benchmarks tag and tag with: a paper-width checkpoint of random kernels saved as a run saves one,
and a synthetic stereo MP3 of a given length (a library: the benchmark commands import it, never each other)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from data_prep import features, synthetic
from emorf_jax import checkpoints
from emorf_jax.models import registry

NUM_TAGS = 56
DEFAULT_TAGS = tuple(f"mood/theme---tag{k}" for k in range(NUM_TAGS))


def write_track(path: Path, seconds: float) -> None:
    """A stereo 44.1-kHz MP3 of `seconds` of the synthetic melody and percussion, the same for every call."""
    rng = np.random.default_rng(0)
    samples = int(seconds * synthetic.SAMPLE_RATE)
    mono = 0.3 * synthetic.melody(samples, False, rng) + 0.2 * synthetic.percussion(samples, False, rng)
    synthetic.write_mp3(path, np.stack([mono, np.roll(mono, 441)], axis=1).astype(np.float32))


def save_checkpoint(directory: Path, base_channels: int, window_frames: int, tags: Sequence[str] = DEFAULT_TAGS) -> str:
    """A checkpoint of the paper's FA-ResNet at `base_channels` for `tags`, random kernels, as `emorf_jax.train` saves
    one."""
    settings = features.settings_for("hop512")
    fields = {
        "name": "cp_resnet",
        "num_classes": len(tags),
        "rho": 5,
        "base_channels": base_channels,
        "frequency_aware": True,
        "shake_shake": False,
        "features_shift": False,
    }
    model = registry.build(fields)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, settings.n_mels, 64, 1), np.float32))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            rng.normal(0.0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape).astype(np.float32)
            if path[-1].key == "kernel"
            else leaf
        ),
        variables,
    )
    meta = {
        "kind": "swa",
        "step": 0,
        "model": fields,
        "tags": list(tags),
        "features": dataclasses.asdict(settings),
        "normalisation": {"mean": [-30.0] * settings.n_mels, "std": [20.0] * settings.n_mels},
        "window_frames": window_frames,
    }
    with checkpoints.open_manager(str(directory), checkpoints.SWA) as manager:
        checkpoints.save(manager, 1, variables, meta)
    return str(directory / checkpoints.SWA)
