"""Trains and evaluates a model: `python -m emorf_jax.main --config=configs/faresnet.py --workdir=runs/fa`.

All hyper-parameters live in the config (`configs/`); a config variant follows a colon, e.g.
`--config=configs/faresnet.py:demo`, and single fields can be overridden, e.g. `--config.batch_size=32`.
When the config asks for synthetic data (`dataset.synthetic_tracks`, the demo) and none is prepared yet, the data
preparation batch steps run first (`emorf_jax/demo.py`), as the separate commands a user would type, so that
training only ever reads prepared data.

Several hosts train one model on JAX's multi-controller runtime: start the same command on every host with
`--distributed` (SLURM, Open MPI, Cloud TPU and Kubernetes are detected) or with `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`; README.md, "Training on several hosts", shows the launchers.

Exit status: 0 when the run has written its test report. 2, with one line on stderr, for a mistake found before
anything is written in the workdir (a flag or config field, a missing prepared dataset, a tag count that is not the
data's, a checkpoint folder given as --workdir, a workdir of another config) or a workdir in use by another live
run (its pid, host and start). 1, with one line, when the disk fills during a checkpoint save: the checkpoints
before it are intact, and the same command resumes once there is space. SIGTERM (a scheduler's preemption notice)
or SIGINT (Ctrl-C) during training ends the step in progress, saves it as a resumable checkpoint, logs one line and
exits with 143 (SIGTERM) or 130 (SIGINT), as death by that signal would: the same command loses no step. On
several hosts every process stops at the same step (JAX's preemption service).
"""

import logging as python_logging
import os
import sys

# TensorFlow only writes TensorBoard summaries here: keep its C++ start-up chatter out (its oneDNN notice ignores
# TF_CPP_MIN_LOG_LEVEL; oneDNN only speeds up TensorFlow's own ops, which compute nothing of ours).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from data_prep import extras

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, TensorBoard logs and the test report; one run at a time (a lock file). SIGTERM or "
    "SIGINT saves the step in progress and exits with 143 or 130; the same command resumes.",
)
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
    """Passes our own INFO lines (and clu's metric lines) and every library's warnings and errors, the latter
    without their tracebacks: an error that ends the run reaches our code, which names it in one line (orbax logs
    the traceback of a failed write in its own thread before it raises it to us)."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        own = any(part in record.pathname for part in _OWN_CODE)
        if record.levelno >= python_logging.WARNING:
            if not own:
                record.exc_info, record.exc_text = None, None
            return "is an ordered dataset" not in record.getMessage()  # expected: training shuffles ordered shards
        return own


def _refuse(message: object, status: int = 2, *, abandon_threads: bool = False) -> None:
    """Ends the command with one line: a user's mistake or a fault the user can mend, no traceback. With
    `abandon_threads` (a failed checkpoint write) the process ends at once, after flushing the logs: orbax's writer
    threads, still failing, would otherwise print their own traceback while the interpreter shuts down."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if abandon_threads:
        sys.stdout.flush()
        python_logging.shutdown()
        os._exit(status)
    sys.exit(status)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with the config file loaded here, so that a wrong flag, config file or --config.field
    ends in one line."""
    try:
        args = FLAGS(argv)
        FLAGS.config  # noqa: B018 (loads the config file and applies the overrides)
    except flags.Error as error:
        _refuse(f"{error}; see --helpshort")
    except (AttributeError, KeyError) as error:  # ml_collections: an override of a field the config does not have
        while error.args and isinstance(error.args[0], BaseException):  # the KeyError inside the AttributeError
            error = error.args[0]
        detail = "; ".join(line.strip() for line in str(error.args[0] if error.args else error).splitlines())
        _refuse(f"a --config.<field> override names a field the config does not have: {detail}")
    except (OSError, ValueError, TypeError) as error:  # the config file is missing, or failed to load
        _refuse(f"cannot load --config: {str(error).strip().splitlines()[-1].strip()}")
    return args


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    extras.exit_unless_installed(extras.TRAIN, "python -m emorf_jax.main")
    # imported after the check: training needs the [train] extra
    from emorf_jax import checkpoints, demo, distributed, train, workdir_lock

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
    demo.prepare_synthetic_data(FLAGS.config, FLAGS.workdir)
    try:
        prepared = train.check_run(FLAGS.config, FLAGS.workdir)
    except (FileNotFoundError, ValueError) as error:
        _refuse(error)
    distributed.use_compilation_cache(FLAGS.compilation_cache_dir, FLAGS.workdir)  # after the checks: in the workdir
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir, prepared)
    except workdir_lock.WorkdirLocked as error:
        _refuse(error)
    except checkpoints.OutOfSpace as error:
        _refuse(error, status=1, abandon_threads=True)
    except OSError as error:  # another file of the run: the config, the report
        full = checkpoints.out_of_space(error, error.filename or FLAGS.workdir)
        if full is None:
            raise
        _refuse(full, status=1, abandon_threads=True)
    except train.TrainingStopped as stopped:  # its line is logged
        sys.exit(stopped.exit_status)
    if distributed.is_primary():
        print(f"\nTag music with the model just trained:\n  {demo.predict_command(FLAGS.config, FLAGS.workdir)}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
