"""Test-session settings and the fixtures shared by the data and training tests.

Every test process (and the subprocesses the tests start) sees two CPU devices, so the pmapped code runs on
several devices for real, and shares a persistent XLA compilation cache: on CPU, compiling a CP-ResNet takes
longer than running it, and the end-to-end tests compile the same programs in several processes.
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "emorf_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np
import pytest

from configs import faresnet
from data_prep import preparation, synthetic
from data_prep.reader import load_prepared
from emorf_jax import checkpoints, train

SYNTHETIC_TRACKS = 24
# Frames per stored chunk in the tests' shards (the real 20 s would be 1,722): with tracks of a median 6 s (517
# frames), every track spans several chunks and ends in a tail shorter than a training crop or a window.
CHUNK_FRAMES = 160


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory) -> Path:
    """Root of a synthetic MTG-Jamendo tree (``audio/``, ``data/``): lengths spread like the real ones around a
    median of 6 s, plus one track of 30-50 s."""
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.make_synthetic(root, num_tracks=SYNTHETIC_TRACKS, seed=0, long_tracks=1)
    return root


@pytest.fixture(scope="session")
def prepared_data_dir(synthetic_tree, tmp_path_factory) -> tuple[Path, str]:
    """(data_dir, config_name) of the hop512 dataset of ``synthetic_tree``, built by the real CLI code path."""
    data_dir = tmp_path_factory.mktemp("prepared")
    preparation.build_dataset(
        preparation.BuildOptions(
            synthetic_tree / "audio",
            synthetic_tree / "data",
            data_dir,
            features="hop512",
            split_index=0,
            workers=2,
            progress=False,
            chunk_frames=CHUNK_FRAMES,
        )
    )
    return data_dir, "hop512"


def _random_checkpoint(directory: Path, prepared, seed: int) -> Path:
    """A real orbax checkpoint of the test config's FA-ResNet with random weights, as a run writes it."""
    config = faresnet.get_config("test")
    fields = train.model_fields(config, len(prepared.tags))
    variables = train.create_model(fields).init(jax.random.PRNGKey(seed), np.zeros((1, 256, 64, 1), np.float32))
    leaves, treedef = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    params = jax.tree.unflatten(
        treedef, [leaf + 0.2 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
    )
    with checkpoints.open_manager(str(directory), checkpoints.SWA) as manager:
        checkpoints.save(
            manager,
            10,
            {"params": params, "batch_stats": variables["batch_stats"]},
            train.checkpoint_meta(fields, prepared, config, "swa", 10, 2.5),
        )
    return directory / checkpoints.SWA


@pytest.fixture(scope="session")
def random_checkpoints(prepared_data_dir, tmp_path_factory) -> list[str]:
    """Two checkpoints of two different random models on the shared prepared dataset (no training needed)."""
    prepared = load_prepared(*prepared_data_dir)
    return [str(_random_checkpoint(tmp_path_factory.mktemp(f"run{seed}"), prepared, seed)) for seed in (0, 5)]
