"""The flags of every command that trains (`main`, `rf_sweep`, `ensemble_recipe`): `--config=FILE[:variant]` and
any number of `--config.field=value` overrides, parsed by absl and ml_collections, so that every such command takes
the same spelling, a typo in a field is answered with "did you mean", and every mistake ends the command in one line
(docs/training.md, "Configs and overrides").

A command that starts several runs builds each run's config from the one `--config` names (a ρ, a seed) or from
another config file (a sweep's baseline, an ensemble member); `with_overrides` gives the latter the same overrides,
so that `--config.num_epochs=2` holds for every run the command starts.
"""

import logging as python_logging
import os
import sys
from typing import Any

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS

_OWN_CODE = (f"{os.sep}emorf_jax{os.sep}", f"{os.sep}data_prep{os.sep}", f"{os.sep}clu{os.sep}")


def define_flags(config_help: str, config_default: str | None = None) -> None:
    """`--config` (required unless it has a default) and `--verbose_libraries`, the flags every command that trains
    shares."""
    config_flags.DEFINE_config_file("config", config_default, config_help, lock_config=True)
    flags.DEFINE_bool("verbose_libraries", False, "Also show the INFO logs of orbax, TFDS and other libraries.")
    if config_default is None:
        flags.mark_flag_as_required("config")


def refuse(message: object, status: int = 2, *, abandon_threads: bool = False) -> None:
    """Ends the command with one line: a user's mistake or a fault the user can mend, no traceback. With
    `abandon_threads` (a failed checkpoint write) the process ends at once, after flushing the logs: orbax's writer
    threads, still failing, would otherwise print their own traceback while the interpreter shuts down."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if abandon_threads:
        sys.stdout.flush()
        python_logging.shutdown()
        os._exit(status)
    sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with the config file loaded here, so that a wrong flag, config file or --config.field
    ends in one line; for `app.run(main, flags_parser=parse_flags)`."""
    try:
        args = FLAGS(argv)
        FLAGS.config.keys()  # loads the config file and applies the overrides; a file that failed raises here
    except flags.Error as error:
        refuse(f"{error}; see --helpshort")
    except (AttributeError, KeyError) as error:  # ml_collections: an override of a field the config does not have
        while error.args and isinstance(error.args[0], BaseException):  # the KeyError inside the AttributeError
            error = error.args[0]
        detail = "; ".join(line.strip() for line in str(error.args[0] if error.args else error).splitlines())
        refuse(f"a --config.<field> override names a field the config does not have: {detail}")
    except (OSError, ValueError, TypeError) as error:  # the config file is missing, or failed to load
        refuse(f"cannot load --config: {str(error).strip().splitlines()[-1].strip()}")
    if len(args) > 1:
        refuse(f"unexpected arguments: {' '.join(args[1:])}; see --helpshort")
    return args


def config_variant() -> str | None:
    """The variant `--config=FILE:variant` names, or None."""
    return FLAGS["config"].config_filename.partition(":")[2] or None


def overrides() -> dict[str, Any]:
    """The `--config.field=value` overrides given, by dotted field name."""
    return dict(config_flags.get_override_values(FLAGS["config"]))


def with_overrides(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with `values` (dotted field name -> value) set; a field it does not have is refused with
    ml_collections' "did you mean"."""
    config = config.copy_and_resolve_references()
    config.update_from_flattened_dict(values)
    return config


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


def quiet_libraries() -> None:
    """Keeps the libraries' INFO lines out of the log unless `--verbose_libraries`."""
    if not FLAGS.verbose_libraries:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
