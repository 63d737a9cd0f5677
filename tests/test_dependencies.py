"""Every third-party package the code imports is declared in pyproject.toml, so a fresh install
never depends on what another package happens to pull in. The library, tasks and flows need a
core dependency or an extra; tests and benches may also use the `dev` extra."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

FIRST_PARTY = {"onpolicy_core", "tasks", "flows", "tests", "bench", "conftest", "common"}
"""`common` is bench/common.py, imported by the benches from their own folder."""


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)).lower()


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {extra: {_name(r) for r in reqs} for extra, reqs in project.get("optional-dependencies", {}).items()}
    return {_name(r) for r in project["dependencies"]}, extras


def imported_packages(folders: list[str]) -> dict[str, set[str]]:
    """Top-level third-party module name -> files that import it."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def undeclared(imports: dict[str, set[str]], allowed: set[str]) -> list[str]:
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module, files in sorted(imports.items()):
        dists = {_name(d) for d in distributions.get(module, [])}
        if not dists:
            missing.append(f"{module} (not installed; imported by {sorted(files)[0]})")
        elif not dists & allowed:
            missing.append(f"{module} (from {sorted(dists)}; imported by {sorted(files)[0]})")
    return missing


def test_the_library_imports_only_declared_packages():
    core, extras = declared()
    allowed = core | extras["vllm-cpu"] | extras["vllm"]
    assert not undeclared(imported_packages(["onpolicy_core", "tasks", "flows"]), allowed)


def test_tests_and_benches_import_only_declared_packages():
    core, extras = declared()
    allowed = core | set().union(*extras.values())
    assert not undeclared(imported_packages(["tests", "bench"]), allowed)


def test_an_undeclared_import_is_found():
    assert undeclared({"yaml": {"x.py"}}, {"pyyaml"}) == []
    assert undeclared({"yaml": {"x.py"}}, {"torch"}) == ["yaml (from ['pyyaml']; imported by x.py)"]
    assert undeclared({"no_such_module_here": {"x.py"}}, set())[0].startswith("no_such_module_here (not installed")
