"""The DVC graph never calls a stale result up to date: every stage lists, as deps, every
`onpolicy_core` module its command runs (the import closure, read with `ast`), and only the params
its code reads."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

PACKAGE = ROOT / "onpolicy_core"


def _module_file(name: str) -> Path | None:
    if not (name == "onpolicy_core" or name.startswith("onpolicy_core.")):
        return None
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(path: Path) -> set[Path]:
    """Files of the onpolicy_core modules `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            file = _module_file(name)
            if file is not None:
                found.add(file)
    return found


def closure(start: set[Path]) -> set[Path]:
    seen, todo = set(), list(start)
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo.extend(imported_modules(file) - seen)
    return {f for f in seen if f.name != "__init__.py" or f.read_text().strip()}


def command_modules(command: str) -> set[Path]:
    """What `onpolicy <command>` runs: the modules its function in cli.py imports, plus the
    modules cli.py itself imports at the top (the config loader)."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    top = {(_module_file(n.module)) for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            names = {node.name, node.name.rstrip("_")}
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call):
                    names |= {k.value.value for k in deco.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)}
            if command in names:
                inner = {_module_file(n.module) for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.module}
                return {f for f in top | inner if f is not None}
    raise AssertionError(f"no cli command {command!r}")


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _stage_body(stage: dict) -> dict:
    return stage.get("do", stage)


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_cover_every_module_its_command_imports(name):
    body = _stage_body(stages()[name])
    match = re.match(r"onpolicy(?:-sharded)? (\w[\w-]*)", body["cmd"])  # onpolicy-sharded: the same command, fanned out
    assert match, f"{name}: command {body['cmd']!r} is not an onpolicy stage"
    needed = closure(command_modules(match.group(1)))
    deps = [ROOT / d for d in body.get("deps", []) if not d.startswith("$")]
    missing = sorted(str(f.relative_to(ROOT)) for f in needed
                     if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {name!r} runs these modules but does not list them as deps: {missing}"
    extra = sorted(str(d.relative_to(ROOT)) for d in deps
                   if PACKAGE in d.parents and not any(f == d or d in f.parents for f in needed))
    assert not extra, f"dvc.yaml stage {name!r} lists modules it never imports (needless reruns): {extra}"


def test_train_stages_read_only_their_own_method_block():
    body = _stage_body(stages()["train"])
    assert body["params"] == ["train.common", "${item.params}"]
    assert "${item.data}" in body["deps"] and not any("realign" in d for d in body["deps"])


def test_realign_variants_read_only_their_own_mixing():
    params = _stage_body(stages()["realign"])["params"]
    assert "realign" not in params and "realign.mixing" not in params and "realign.mixing.${item}" in params
