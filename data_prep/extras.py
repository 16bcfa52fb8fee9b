"""Which install a command needs, checked before it does any work.

A plain `pip install emorf_jax` tags music (the model side, features, checkpoints, reports); data preparation and
training need the `[train]` extra (setup.py's TRAIN_REQUIREMENTS: TensorFlow, TFDS, grain, clu, TensorBoard), whose
wheels some platforms lack. The commands that need it check it first, so that a plain install stops at once with the
line to run, instead of hours into a build or on an import deep in a run.
"""

import importlib.util
import sys

TRAIN = "train"
# The import names of the packages each extra brings (setup.py names their distributions).
EXTRA_MODULES = {TRAIN: ("tensorflow", "tensorflow_datasets", "importlib_resources", "grain", "clu", "tensorboard")}


def missing_modules(extra: str) -> list[str]:
    """The packages of `extra` that this environment lacks, by import name; found, not imported (TensorFlow takes
    seconds to import)."""
    return [module for module in EXTRA_MODULES[extra] if importlib.util.find_spec(module) is None]


def exit_unless_installed(extra: str, command: str) -> None:
    """Ends `command` with the pip line that installs `extra` when any of its packages is missing."""
    missing = missing_modules(extra)
    if missing:
        sys.exit(
            f"{command}: error: {', '.join(missing)} not installed, which the [{extra}] extra brings: "
            f"pip install 'emorf_jax[{extra}]' (from a checkout: pip install -e '.[{extra}]')"
        )
