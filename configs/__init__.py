"""The configs: one module per model or recipe, each with `get_config(variant)`; `load_config` reads one from its
file, as the commands' `--config=path/to/config.py[:variant]` names it."""

import importlib.util
import os

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py[:variant]` -> its `get_config(variant)`."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("config_file", path)
    if module_spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)
