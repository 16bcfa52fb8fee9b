"""The import rules of docs/architecture.md, read from the source: commands on top, libraries below, data one way.

A command is a module that runs as `python -m ...`: a package's `__main__.py` or a module with an
`if __name__ == "__main__":` block. Nothing but the tests imports a command, so that each job (tagging, a report,
an ensemble) has one home in a library that every command, benchmark and notebook shares.
"""

import ast
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("emorf_jax", "data_prep", "benchmarks", "configs")
# What emorf_jax may import of data_prep: the read side, the feature code that tagging shares and the install check
# of the commands (`data_prep.extras`); never a writer. `data_prep.files` holds no writer of prepared data, only the
# atomic-write and full-disk helpers that every writer shares.
READ_SIDE = {
    "data_prep.reader",
    "data_prep.layout",
    "data_prep.metadata",
    "data_prep.features",
    "data_prep.extras",
    "data_prep.files",
    "data_prep.deadline",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_command(path: Path, tree: ast.Module) -> bool:
    """A package's `__main__.py`, or a module whose top level tests `__name__ == "__main__"`."""
    if path.name == "__main__.py":
        return True
    return any(
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        for node in tree.body
    )


def _imported_modules(tree: ast.AST) -> set[str]:
    """Every module an AST imports anywhere (in functions too): `from a import b` counts as `a` and `a.b`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    """{module: (path, AST)} of the project's code outside tests/, the notebook's code cells included."""
    sources = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            sources[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        code = "\n".join(
            line
            for cell in cells
            if cell["cell_type"] == "code"
            for line in "".join(cell["source"]).splitlines()
            if not line.startswith("%")  # IPython magics are not Python
        )
        sources[f"notebooks.{path.stem}"] = (path, ast.parse(code, str(path)))
    return sources


SOURCES = _sources()
COMMANDS = {name for name, (path, tree) in SOURCES.items() if _is_command(path, tree)}


def test_the_commands_are_found():
    """The rule below means something only if the commands are seen as commands."""
    expected = {
        "emorf_jax.main",
        "emorf_jax.evaluate",
        "emorf_jax.predict.__main__",
        "emorf_jax.ensemble.__main__",
        "emorf_jax.ensemble_recipe.__main__",
        "emorf_jax.rf_sweep.__main__",
        "emorf_jax.erf.__main__",
        "emorf_jax.export.__main__",
        "data_prep.build",
        "benchmarks.paper_table",
    }
    assert expected <= COMMANDS, sorted(expected - COMMANDS)


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_module_imports_a_command(module):
    path, tree = SOURCES[module]
    own_command = f"{module.removesuffix('.__main__')}.__main__"  # a package's __main__ is not its library
    imported = sorted(name for name in _imported_modules(tree) & COMMANDS if name != own_command)
    assert not imported, f"{path.relative_to(REPO)} imports the command(s) {imported}: move what it needs to a library"


@pytest.mark.parametrize("module", sorted(name for name in SOURCES if name.startswith("emorf_jax")))
def test_emorf_jax_reads_prepared_data_through_the_read_side_only(module):
    path, tree = SOURCES[module]
    # `from data_prep import reader` names `data_prep` and `data_prep.reader`; `from data_prep.reader import
    # FrameReader` names `data_prep.reader.FrameReader`, whose module is `data_prep.reader`.
    writers = sorted(
        name
        for name in _imported_modules(tree)
        if name.split(".")[0] == "data_prep"
        and name != "data_prep"
        and name not in READ_SIDE
        and name.rpartition(".")[0] not in READ_SIDE
    )
    assert not writers, f"{path.relative_to(REPO)} imports {writers}; emorf_jax may use only {sorted(READ_SIDE)}"


@pytest.mark.parametrize("module", sorted(name for name in SOURCES if not name.startswith("benchmarks")))
def test_data_flows_one_way(module):
    """data_prep knows nothing of the model side; no library or notebook imports a benchmark or a test."""
    path, tree = SOURCES[module]
    imported = _imported_modules(tree)
    upstream = {"benchmarks", "tests"} | ({"emorf_jax"} if module.startswith("data_prep") else set())
    wrong = sorted(name for name in imported if name.split(".")[0] in upstream)
    assert not wrong, f"{path.relative_to(REPO)} imports {wrong}"
