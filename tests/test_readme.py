"""The commands of the README and of the docs pages (docs/*.md) exist as written, and every command explains itself:
each `python -m` module (those the pages show and every other command of tests/test_import_rules.py) starts, its
`--help` shows the `python -m` form and the module's whole first paragraph, and every flag a page gives it is one the
command takes. The commands themselves run on small data in the tests of each module (test_predict, test_ensemble,
test_train, test_baselines, test_build, test_synthetic, test_benchmarks, test_multihost)."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import test_import_rules
from tests.process_output import stderr_excerpt

REPO = Path(__file__).resolve().parents[1]
OWN_PACKAGES = ("emorf_jax", "data_prep", "benchmarks")
# The front page and the pages it sends the reader to, each with commands to type.
PAGES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))


def _page_name(page: Path) -> str:
    return str(page.relative_to(REPO))


def _page_commands(page: Path) -> dict[str, set[str]]:
    """{module: the flags the page passes it}, from its shell blocks (continuation lines joined) and from its inline
    `python -m ...` spans."""
    text = page.read_text(encoding="utf-8")
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.DOTALL)
    inline = re.findall(r"`([^`\n]*python -m [^`\n]*)`", text)
    commands: dict[str, set[str]] = {}
    for line in [*"\n".join(blocks).replace("\\\n", " ").splitlines(), *inline]:
        for invocation in re.split(r"&&|;|\|", line):
            match = re.search(r"python -m ([\w.]+)(.*)", invocation)
            if match and match.group(1).split(".")[0] in OWN_PACKAGES:
                flags = commands.setdefault(match.group(1), set())
                # config overrides (`--config.batch_size=32`) are fields of the config, not flags
                flags.update(flag for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)(?![\w.])", match.group(2)))
    return commands


def _docs_commands(page_commands: dict[str, dict[str, set[str]]]) -> dict[str, dict[str, list[str]]]:
    """{module: {flag: the pages that give it}}, over the README and every docs page."""
    commands: dict[str, dict[str, list[str]]] = {}
    for page, page_modules in page_commands.items():
        for module, flags in page_modules.items():
            module_flags = commands.setdefault(module, {})
            for flag in sorted(flags):
                module_flags.setdefault(flag, []).append(page)
    return commands


PAGE_COMMANDS = {_page_name(page): _page_commands(page) for page in PAGES}
README_COMMANDS = PAGE_COMMANDS["README.md"]
DOCS_COMMANDS = _docs_commands(PAGE_COMMANDS)
# Every command, as `python -m` names it: a package's `__main__` runs as the package.
ALL_COMMANDS = sorted(
    set(DOCS_COMMANDS)
    | {name.removesuffix(".__main__") for name in test_import_rules.COMMANDS if not name.startswith("notebooks.")}
)


def _module_docstring(module: str) -> str:
    path = REPO / Path(*module.split("."))
    path = path / "__main__.py" if path.is_dir() else path.with_suffix(".py")
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def test_the_readme_shows_the_main_commands():
    assert {"emorf_jax.main", "emorf_jax.predict", "data_prep.build", "emorf_jax.evaluate"} <= set(README_COMMANDS)


def test_the_docs_pages_are_read():
    """The commands below are checked on every docs page, so the pages must be found and hold commands."""
    assert len(PAGES) > 1 and all(page.is_file() for page in PAGES)
    assert set(DOCS_COMMANDS) > set(README_COMMANDS), "the docs pages should show commands the README does not"


@pytest.mark.parametrize("module", ALL_COMMANDS)
def test_command_explains_itself_and_takes_the_flags_the_docs_give_it(module):
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    # argparse's --help exits with 0, absl's (emorf_jax.main and the other commands that train) with 1
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr, stderr_excerpt(result.stderr)
    help_text = " ".join(result.stdout.split())
    assert f"python -m {module}" in help_text, "the help should show how to run the command"
    first_paragraph = " ".join(_module_docstring(module).split("\n\n")[0].split())
    assert first_paragraph and first_paragraph in help_text, "the help should carry the docstring's first paragraph"
    # absl lists a boolean flag as `--[no]distributed`
    missing = sorted(
        f"{flag} ({', '.join(pages)})"
        for flag, pages in DOCS_COMMANDS.get(module, {}).items()
        if not re.search(rf"--(\[no\])?{flag.removeprefix('--')}(?![\w-])", help_text)
    )
    assert not missing, f"the docs give {module} flags its --help does not list: {missing}"


def test_every_flag_the_docs_name_is_defined_by_some_command():
    """Flags named in the prose of the README and the docs pages (`--chunk_frames`, `--memory_budget_gb`, ...), not
    only in their commands."""
    defined = {"--help"}
    for package in OWN_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            source = path.read_text(encoding="utf-8")
            defined.update(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))
            defined.update(f"--{name}" for name in re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
    undefined = sorted(
        f"{flag} ({_page_name(page)})"
        for page in PAGES
        # an inline flag: `--retry_failed`
        for flag in set(re.findall(r"`(--[a-z][\w-]*)(?![\w.])[^`]*`", page.read_text(encoding="utf-8")))
        if flag not in defined
    )
    assert not undefined, f"the docs name flags that no command defines: {undefined}"
