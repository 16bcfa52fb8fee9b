"""The light install: tagging needs none of the [train] extra's packages, and a training command without them stops
at once with the pip line that brings them. Each check runs a fresh interpreter; where a package must be absent, that
interpreter's import finders are wrapped so that they do not find it, as in an environment without it (an import
raises ModuleNotFoundError, `importlib.util.find_spec` answers None)."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from data_prep import extras, metadata
from tests.process_output import stderr_excerpt

REPO = Path(__file__).resolve().parents[1]
TRAINING_PACKAGES = ("tensorflow", "tensorflow_datasets", "grain", "clu")

# Runs `python -m MODULE ARGS...` (the arguments after `-c CODE BLOCKED`) where the packages BLOCKED are not found.
WITHOUT = """
import runpy, sys

BLOCKED = set(sys.argv.pop(1).split(","))


class Without:
    def __init__(self, finder):
        self.finder = finder

    def __getattr__(self, name):
        return getattr(self.finder, name)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)


sys.meta_path[:] = [Without(finder) for finder in sys.meta_path]
module = sys.argv.pop(1)
sys.argv[0] = module
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _run_without(blocked: tuple[str, ...], module: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", WITHOUT, ",".join(blocked), module, *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_tagging_modules_import_no_training_package():
    code = (
        "import json, sys\n"
        "import emorf_jax.tagger, emorf_jax.predict, emorf_jax.checkpoints, data_prep.features, data_prep.reader\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.partition('.')[0] in {TRAINING_PACKAGES!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_predict_tags_a_file_where_no_training_package_can_be_imported(random_checkpoints, synthetic_tree):
    track = metadata.read_split(synthetic_tree / "data", 0, "test")[0]
    audio = str(synthetic_tree / "audio" / track.path)
    args = ["--no_progress", audio, f"--checkpoint={random_checkpoints[0]}"]
    tagged = _run_without(TRAINING_PACKAGES, "emorf_jax.predict", *args)
    assert tagged.returncode == 0, stderr_excerpt(tagged.stderr)
    assert tagged.stdout.startswith(f"{audio}\t")
    described = _run_without(TRAINING_PACKAGES, "emorf_jax.predict", f"--describe={random_checkpoints[0]}")
    assert described.returncode == 0, stderr_excerpt(described.stderr)
    assert "model            FA-ResNet" in described.stdout


@pytest.mark.parametrize(
    "module, args",
    [
        ("emorf_jax.main", ["--config=configs/faresnet.py:test", "--workdir={workdir}"]),
        ("emorf_jax.ensemble_recipe", ["--config=configs/avg_ensemble.py:test", "--workdir={workdir}"]),
        ("emorf_jax.rf_sweep", ["--config=configs/faresnet.py:test", "--workdir={workdir}"]),
        ("emorf_jax.erf", ["--config=configs/faresnet.py:test", "--output={workdir}/erf.png"]),
        ("data_prep.build", ["--audio_dir=audio", "--metadata_dir=metadata", "--data_dir={workdir}"]),
    ],
)
def test_a_training_command_without_tensorflow_names_the_extra_to_install(module, args, tmp_path):
    workdir = tmp_path / "out"
    result = _run_without(("tensorflow",), module, *(arg.format(workdir=workdir) for arg in args))
    assert result.returncode != 0
    assert f"{' '.join(['python', '-m', module])}: error: tensorflow not installed" in result.stderr
    assert "pip install 'emorf_jax[train]'" in result.stderr.splitlines()[-1]
    assert not workdir.exists()  # it stopped before doing anything


def test_this_environment_has_every_package_of_the_train_extra():
    """The test install ([test]) brings the [train] extra, so that the README's two commands set everything up."""
    assert extras.missing_modules(extras.TRAIN) == []


def test_this_environment_has_every_distribution_that_the_test_install_promises():
    """Every requirement of `pip install -e '.[test]'` (setup.py, as installed) is met, version included: without
    one, the tests that need it would skip (`pytest.importorskip`: about 20 for onnxruntime) rather than fail."""
    requirements = [Requirement(text) for text in importlib.metadata.requires("emorf_jax")]
    promised = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": "test"})]
    assert {"onnxruntime", "torch", "pytest", "tensorflow-cpu"} <= {r.name for r in promised}
    unmet = {}
    for requirement in promised:
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet[str(requirement)] = "not installed"
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            unmet[str(requirement)] = f"{version} installed"
    assert not unmet, f"the [test] extra's requirements not met: {unmet}; run pip install -e '.[test]'"
