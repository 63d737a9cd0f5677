"""Layers point one way: algorithms (tensors in, tensors out) know nothing of files, tracking or
orchestration; the library knows nothing of Prefect tasks and flows; and no module imports itself
back through a cycle."""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

PACKAGE = ROOT / "onpolicy_core"
ALGORITHM_MODULES = ["ddt.py", "hinted.py", "hinted_vllm.py", "losses.py", "evaluation.py", "statistics.py", "options.py",
                     "grading.py", "prompts.py", "records.py", "data/arithmetic.py", "training/preference.py",
                     "training/sft.py", "generation.py", "choices.py"]
PURE_MODULES = ["ddt.py", "hinted.py", "hinted_vllm.py", "losses.py", "evaluation.py", "statistics.py", "options.py", "choices.py"]
"""The algorithms proper: also no file I/O and no environment changes."""
FORBIDDEN_IN_ALGORITHMS = {"mlflow", "prefect", "dvc", "onpolicy_core.stages", "onpolicy_core.io", "onpolicy_core.tracking",
                           "onpolicy_core.config", "onpolicy_core.dvc_lock", "tasks", "flows"}
FILE_IO_NAMES = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink", "rmtree", "mkstemp",
                 "mkdtemp", "environ", "putenv", "chdir", "dump", "to_parquet", "savefig"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _hits(names: set[str], forbidden: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("module", ALGORITHM_MODULES)
def test_algorithm_modules_do_no_tracking_or_orchestration(module):
    assert not _hits(_imports(PACKAGE / module), FORBIDDEN_IN_ALGORITHMS)


@pytest.mark.parametrize("module", PURE_MODULES)
def test_algorithms_do_no_file_io_and_change_no_environment(module):
    used = set()
    for node in ast.walk(ast.parse((PACKAGE / module).read_text())):
        if isinstance(node, ast.Name) and node.id in FILE_IO_NAMES:
            used.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in FILE_IO_NAMES:
            used.add(node.attr)
    assert not used, f"{module} does file I/O or changes the environment: {sorted(used)}"


def test_library_never_imports_prefect_layers():
    for path in PACKAGE.rglob("*.py"):
        assert not _hits(_imports(path), {"tasks", "flows", "prefect"}), path


def test_tasks_and_flows_only_sequence_stages():
    for folder in ("tasks", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not _hits(_imports(path), {"torch", "transformers", "onpolicy_core.ddt", "onpolicy_core.hinted", "onpolicy_core.losses"}), path


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """onpolicy_core module -> the onpolicy_core modules it imports (anywhere in the file)."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        targets = set()
        for name in _imports(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != "onpolicy_core":
                targets.add(name)
        graph[_module_name(path)] = targets - {_module_name(path)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_data_loaders_take_plain_arguments():
    for module in ("data/sources.py", "data/benchmarks.py", "data/registry.py", "data/arithmetic.py", "data/multiple_choice.py"):
        assert not _hits(_imports(PACKAGE / module), {"onpolicy_core.config"}), module
