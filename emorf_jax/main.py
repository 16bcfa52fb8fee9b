"""Trains and evaluates a model: `python -m emorf_jax.main --config=configs/faresnet.py --workdir=runs/fa`.

All hyper-parameters live in the config (`configs/`); a config variant follows a colon, e.g.
`--config=configs/faresnet.py:demo`, and single fields can be overridden, e.g. `--config.batch_size=32`.
When the config asks for synthetic data (`dataset.synthetic_tracks`, the demo) and none is prepared yet, the data
preparation batch steps run first, as the separate commands a user would type (`python -m data_prep.synthetic`,
`python -m data_prep.build`), so that training only ever reads prepared data.
"""

import logging as python_logging
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data here: keep its C++ chatter out

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data_prep import layout  # noqa: E402
from emorf_jax import train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and the test report.")
flags.DEFINE_bool("verbose_libraries", False, "Also show the INFO logs of orbax, TFDS and other libraries.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

_OWN_CODE = (f"{os.sep}emorf_jax{os.sep}", f"{os.sep}data_prep{os.sep}", f"{os.sep}clu{os.sep}")


class _OwnInfoOnly(python_logging.Filter):
    """Passes our own INFO lines (and clu's metric lines) and every library's warnings and errors."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        if record.levelno >= python_logging.WARNING:
            return "is an ordered dataset" not in record.getMessage()  # expected: training shuffles ordered shards
        return any(part in record.pathname for part in _OWN_CODE)


def data_preparation_commands(config: ml_collections.ConfigDict, workdir: str) -> list[list[str]]:
    """The batch steps that make and prepare the synthetic MTG-Jamendo of a config in `workdir`."""
    root = os.path.join(workdir, "synthetic")
    commands = []
    if not os.path.isdir(os.path.join(root, "audio")):
        commands.append([sys.executable, "-m", "data_prep.synthetic", "--out", root,
                         "--tracks", str(config.dataset.synthetic_tracks), "--seed", str(config.dataset.synthetic_seed),
                         "--duration", str(config.dataset.synthetic_duration),
                         "--workers", str(config.dataset.workers)])
    build = [sys.executable, "-m", "data_prep.build", "--audio_dir", os.path.join(root, "audio"),
             "--metadata_dir", os.path.join(root, "data"), "--data_dir", train.data_dir(config, workdir),
             "--config", config.dataset.config_name, "--split", str(config.dataset.split_index),
             "--workers", str(config.dataset.workers)]
    if config.dataset.chunk_frames:
        build += ["--chunk_frames", str(config.dataset.chunk_frames)]
    return commands + [build]


def prepare_synthetic_data(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs the data preparation steps of the demo unless its prepared data is already there."""
    if config.dataset.synthetic_tracks <= 0 or layout.is_prepared(
            train.data_dir(config, workdir), config.dataset.config_name, config.dataset.split_index):
        return
    for command in data_preparation_commands(config, workdir):
        logging.info("Preparing the demo's data: python %s", " ".join(command[1:]))
        subprocess.run(command, check=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.verbose_libraries:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
    logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(),
                 jax.local_devices())
    prepare_synthetic_data(FLAGS.config, FLAGS.workdir)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
