"""Trains and evaluates a model: `python -m emorf_jax.main --config=configs/faresnet.py --workdir=runs/fa`.

All hyper-parameters live in the config (`configs/`); a config variant follows a colon, e.g.
`--config=configs/faresnet.py:demo`, and single fields can be overridden, e.g. `--config.batch_size=32`.
When the config asks for synthetic data (`dataset.synthetic_tracks`, the demo) and none is prepared yet, the data
preparation batch steps run first (`emorf_jax/demo.py`), as the separate commands a user would type, so that
training only ever reads prepared data.

Several hosts train one model on JAX's multi-controller runtime: start the same command on every host with
`--distributed` (SLURM, Open MPI, Cloud TPU and Kubernetes are detected) or with `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`; README.md, "Training on several hosts", shows the launchers.
"""

import logging as python_logging
import os

# TensorFlow only writes TensorBoard summaries here: keep its C++ start-up chatter out (its oneDNN notice ignores
# TF_CPP_MIN_LOG_LEVEL; oneDNN only speeds up TensorFlow's own ops, which compute nothing of ours).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from data_prep import extras

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and the test report.")
flags.DEFINE_bool("verbose_libraries", False, "Also show the INFO logs of orbax, TFDS and other libraries.")
flags.DEFINE_string(
    "compilation_cache_dir",
    "xla_cache",
    "Where compiled XLA programs are kept, so that a resumed or "
    "repeated run does not compile again: relative to the workdir unless absolute (one directory "
    "can serve many runs); '' turns it off. A JAX_COMPILATION_CACHE_DIR in the environment wins.",
)
flags.DEFINE_bool(
    "distributed",
    False,
    "Start JAX's multi-process runtime, detecting the processes from the "
    "cluster's environment (SLURM, Open MPI, Cloud TPU, Kubernetes).",
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0, for a multi-process run without a "
    "detected cluster (with --num_processes and --process_id).",
)
flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.", lower_bound=1)
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run, from 0.", lower_bound=0)
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

_OWN_CODE = (f"{os.sep}emorf_jax{os.sep}", f"{os.sep}data_prep{os.sep}", f"{os.sep}clu{os.sep}")


class _OwnInfoOnly(python_logging.Filter):
    """Passes our own INFO lines (and clu's metric lines) and every library's warnings and errors."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        if record.levelno >= python_logging.WARNING:
            return "is an ordered dataset" not in record.getMessage()  # expected: training shuffles ordered shards
        return any(part in record.pathname for part in _OWN_CODE)


def use_compilation_cache(directory: str, workdir: str) -> None:
    """Points JAX's persistent compilation cache at `directory` (see --compilation_cache_dir)."""
    if directory and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, os.path.expanduser(directory)))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    extras.exit_unless_installed(extras.TRAIN, "python -m emorf_jax.main")
    from emorf_jax import demo, distributed, train  # imported after the check: training needs the [train] extra

    if not FLAGS.verbose_libraries:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
    distributed.initialize(
        auto_detect=FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(), jax.local_devices())
    if not distributed.is_primary():
        logging.set_verbosity(logging.WARNING)  # process 0 logs the run; the others only their problems
    use_compilation_cache(FLAGS.compilation_cache_dir, FLAGS.workdir)
    demo.prepare_synthetic_data(FLAGS.config, FLAGS.workdir)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if distributed.is_primary():
        print(f"\nTag music with the model just trained:\n  {demo.predict_command(FLAGS.config, FLAGS.workdir)}")


if __name__ == "__main__":
    app.run(main)
