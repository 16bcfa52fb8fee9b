"""The demo's own data, and the command that tags music with what it trained.

When a config asks for synthetic data (`dataset.synthetic_tracks`) and none is prepared yet, the data preparation
batch steps run first, as the separate commands a user would type (`python -m data_prep.synthetic`, then
`python -m data_prep.build`), so that training only ever reads prepared data.
"""

import os
import shlex
import subprocess
import sys

import ml_collections
from absl import logging

from data_prep import features, layout, metadata
from emorf_jax import checkpoints, distributed, train


def data_preparation_commands(config: ml_collections.ConfigDict, workdir: str) -> list[list[str]]:
    """The batch steps that make and prepare the synthetic MTG-Jamendo of a config in `workdir`."""
    root = os.path.join(workdir, "synthetic")
    commands = []
    if not os.path.isdir(os.path.join(root, "audio")):
        commands.append(
            [
                sys.executable,
                "-m",
                "data_prep.synthetic",
                "--out",
                root,
                "--tracks",
                str(config.dataset.synthetic_tracks),
                "--seed",
                str(config.dataset.synthetic_seed),
                "--duration",
                str(config.dataset.synthetic_duration),
                "--workers",
                str(config.dataset.workers),
                "--subset",
                config.dataset.synthetic_subset,
            ]
        )
    inputs = os.path.join(root, "audio")
    if features.settings_for(config.dataset.config_name).source == "npy":  # the organisers' format, made from the MP3s
        commands.append(
            [
                sys.executable,
                "-m",
                "data_prep.essentia_like",
                "--audio_dir",
                inputs,
                "--metadata_dir",
                os.path.join(root, "data"),
                "--out",
                os.path.join(root, "npy"),
                "--workers",
                str(config.dataset.workers),
            ]
        )
        inputs = os.path.join(root, "npy")
    build = [
        sys.executable,
        "-m",
        "data_prep.build",
        "--audio_dir",
        inputs,
        "--metadata_dir",
        os.path.join(root, "data"),
        "--data_dir",
        train.data_dir(config, workdir),
        "--features",
        config.dataset.config_name,
        "--split",
        str(config.dataset.split_index),
        "--workers",
        str(config.dataset.workers),
        "--subset",
        config.dataset.synthetic_subset,
    ]
    if config.dataset.chunk_frames:
        build += ["--chunk_frames", str(config.dataset.chunk_frames)]
    return commands + [build]


def prepare_synthetic_data(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs the data preparation steps of the demo unless its prepared data is already there: once, by process
    0, in the workdir all processes share, while the others wait."""
    if (
        distributed.is_primary()
        and config.dataset.synthetic_tracks > 0
        and not layout.is_prepared(
            train.data_dir(config, workdir), config.dataset.config_name, config.dataset.split_index
        )
    ):
        for command in data_preparation_commands(config, workdir):
            logging.info("Preparing the demo's data: %s", shlex.join([_python_as_typed(), *command[1:]]))
            subprocess.run(command, check=True)
    distributed.barrier("demo data prepared")


def predict_command(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The command that tags music with the model a run has just trained (its SWA model, else the selected or the
    latest one), as a user would type it from here: on a test track of the demo's synthetic data, if there is one."""

    def saved(kind: str) -> bool:
        directory = os.path.join(workdir, kind)
        return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))

    kind = next(filter(saved, (checkpoints.SWA, checkpoints.BEST)), checkpoints.LATEST)
    synthetic = os.path.join(workdir, "synthetic")
    audio = "song.mp3"
    if os.path.isdir(os.path.join(synthetic, "audio")):
        data = os.path.join(synthetic, "data")
        track = metadata.read_split(data, config.dataset.split_index, "test", config.dataset.synthetic_subset)[0]
        audio = os.path.join(synthetic, "audio", track.path)
    return shlex.join(
        [_python_as_typed(), "-m", "emorf_jax.predict", audio, f"--checkpoint={os.path.join(workdir, kind)}"]
    )


def _python_as_typed() -> str:
    """This interpreter as a user would type it here: `.venv/bin/python` from the repository root."""
    relative = os.path.relpath(sys.executable)
    return sys.executable if relative.startswith(os.pardir) else relative
