"""tests/README.md is the map of the tests: every file under tests/ and every module of the package is
listed there, and every file it lists exists (so the map cannot drift from the folders)."""

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _listed() -> set[str]:
    """The files named in the first column of "Shared helpers" and the second column of "Module → test
    files" (the first column of that table names m141jax modules, which this test does not check)."""
    names, column = set(), None
    for line in (HERE / "README.md").read_text().splitlines():
        if line.startswith("## "):
            column = {"## Shared helpers": 1, "## Module → test files": 2}.get(line.strip())
        elif column and line.startswith("|") and not set(line) <= set("|- "):
            names.update(re.findall(r"`(\w+\.py)`", line.split("|")[column]))
    return names


def test_the_map_is_read():
    assert {"conftest.py", "fixtures.py", "test_sampling.py", "test_layout.py"} <= _listed()


def test_every_test_file_is_in_the_readme():
    missing = sorted({p.name for p in HERE.glob("*.py")} - _listed())
    assert not missing, f"add these files to tests/README.md: {missing}"


def test_every_listed_file_exists():
    gone = sorted(n for n in _listed() if not (HERE / n).is_file())
    assert not gone, f"tests/README.md lists files that do not exist: {gone}"


def _modules_listed() -> set[str]:
    """The m141jax/... paths named in the first column of "Module → test files"."""
    names, inside = set(), False
    for line in (HERE / "README.md").read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Module → test files"
        elif inside and line.startswith("|") and not set(line) <= set("|- "):
            names.update(re.findall(r"`(m141jax/[\w/]+\.py)`", line.split("|")[1]))
    return names


def test_every_module_is_in_the_readme_and_exists():
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "m141jax").rglob("*.py")}
    listed = _modules_listed()
    assert not sorted(modules - listed), f"add these modules to tests/README.md: {sorted(modules - listed)}"
    assert not sorted(listed - modules), f"tests/README.md lists modules that do not exist: {sorted(listed - modules)}"
