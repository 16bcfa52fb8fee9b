"""Trains and evaluates a model: `python -m emorf_jax.main --config=configs/faresnet.py --workdir=runs/fa`.

All hyper-parameters live in the config (`configs/`); a config variant follows a colon, e.g.
`--config=configs/faresnet.py:demo`, and single fields can be overridden, e.g. `--config.batch_size=32`.
When the config asks for synthetic data (`dataset.synthetic_tracks`, the demo) and none is prepared yet, the data
preparation batch steps run first (`emorf_jax/demo.py`), as the separate commands a user would type, so that
training only ever reads prepared data.

Several hosts train one model on JAX's multi-controller runtime: start the same command on every host with
`--distributed` (SLURM, Open MPI, Cloud TPU and Kubernetes are detected) or with `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`; docs/training.md, "Training on several hosts", shows the launchers.

Exit status: 0 when the run has written its test report. 3 when it has written it without the final checkpoints
(`best/`, `swa/`, snapshots) that cannot be read, each named in one line: the report and the snapshot ensemble are
made from the intact ones. 2, with one line on stderr, for a mistake found before anything is written in the workdir
(a flag or config field, a missing prepared dataset, a tag count that is not the data's, a checkpoint folder given as
--workdir, a workdir of another config), a workdir in use by another live run (its pid, host and start), or a
resumable checkpoint that holds another model structure than the config builds (the first differing parameter and
its two shapes; nothing is moved). 1, with one line, when the disk fills during a checkpoint save: the checkpoints
before it are intact, and the same command resumes once there is space; on several hosts, a process that fails ends
every process with that same line and status 1. SIGTERM (a scheduler's preemption notice) or SIGINT (Ctrl-C) during
training ends the step in progress, saves it as a resumable checkpoint, logs one line and exits with 143 (SIGTERM) or
130 (SIGINT), as death by that signal would: the same command loses no step. On several hosts every process stops
at the same step (JAX's preemption service).
"""

import os
import sys
import traceback
from typing import NoReturn

# TensorFlow only writes TensorBoard summaries here: keep its C++ start-up chatter out (its oneDNN notice ignores
# TF_CPP_MIN_LOG_LEVEL; oneDNN only speeds up TensorFlow's own ops, which compute nothing of ours).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
from absl import app, flags, logging

from data_prep import extras
from emorf_jax import command_line

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, TensorBoard logs and the test report; one run at a time (a lock file). SIGTERM or "
    "SIGINT saves the step in progress and exits with 143 or 130; the same command resumes.",
)
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
command_line.define_flags("Training configuration file[:variant]; fields are overridden with --config.field=value.")
flags.mark_flag_as_required("workdir")
LEFT_OUT_STATUS = 3  # the report is written without the final checkpoints that cannot be read


def main(argv: list[str]) -> None:
    extras.exit_unless_installed(extras.TRAIN, "python -m emorf_jax.main")
    # imported after the check: training needs the [train] extra
    from emorf_jax import checkpoints, demo, distributed, train, workdir_lock

    command_line.quiet_libraries()
    distributed.initialize(
        auto_detect=FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    distributed.watch_for_failures(lambda line: command_line.refuse(line, status=1, abandon_threads=True))
    logging.info("JAX process %d/%d, local devices: %s", jax.process_index(), jax.process_count(), jax.local_devices())
    if not distributed.is_primary():
        logging.set_verbosity(logging.WARNING)  # process 0 logs the run; the others only their problems
    demo.prepare_synthetic_data(FLAGS.config, FLAGS.workdir)
    try:
        prepared = train.check_run(FLAGS.config, FLAGS.workdir)
    except (FileNotFoundError, ValueError) as error:
        command_line.refuse(error)
    distributed.use_compilation_cache(FLAGS.compilation_cache_dir, FLAGS.workdir)  # after the checks: in the workdir
    try:
        run_report = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, prepared)
    except (workdir_lock.WorkdirLocked, checkpoints.StructureMismatch) as error:  # every process meets the same
        command_line.refuse(error)
    except train.TrainingStopped as stopped:  # its line is logged
        sys.exit(stopped.exit_status)
    except Exception as error:
        _end_every_process(error)
    if run_report.left_out:  # each named in a line already
        sys.exit(LEFT_OUT_STATUS)
    if distributed.is_primary():
        print(f"\nTag music with the model just trained:\n  {demo.predict_command(FLAGS.config, FLAGS.workdir)}")


def _end_every_process(error: Exception) -> NoReturn:
    """Ends the job in one line, the same on every process, when one process fails: a full disk (during a checkpoint
    save, or writing the config or the report), or anything else, which this process's traceback details. The
    other processes, most likely waiting for this one in a collective or a barrier, end at once with the line."""
    from emorf_jax import checkpoints, distributed

    full = error if isinstance(error, checkpoints.OutOfSpace) else None
    if isinstance(error, OSError) and full is None:
        full = checkpoints.out_of_space(error, error.filename or FLAGS.workdir)
    if full is None and jax.process_count() == 1:
        raise error
    if full is None:
        traceback.print_exception(error)
        detail = str(error).splitlines()[0][:200] if str(error) else ""
        line = f"process {jax.process_index()} failed ({type(error).__name__}: {detail}); its log has the traceback"
    else:
        line = str(full)
    distributed.announce_failure(line)
    command_line.refuse(line, status=1, abandon_threads=True)


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.parse_flags)
