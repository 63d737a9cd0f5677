"""Layers point one way, and the folders of `onpolicy_core/` are the layers: a module imports only
modules of its own folder or of a lower layer. Algorithms (tensors in, tensors out) know nothing of
files, tracking or orchestration; the library knows nothing of Prefect tasks and flows; and no
module imports itself back through a cycle."""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

PACKAGE = ROOT / "onpolicy_core"
LAYERS = {
    "algorithms": 0,  # the paper's math and decoding: tensors in, tensors out
    "decoding": 1,    # the algorithms inside HF generate and vLLM
    "training": 1,    # the losses inside TRL trainers
    "data": 2,        # records, their files, dataset generators and readers (plain arguments, never the config)
    "plumbing": 3,    # config, MLflow tracking, model loading, DVC lock, presets
    "stages": 4,      # one module per DVC stage, on stages/skeleton.py
    "cli.py": 5,      # the entry point
}
"""A folder's rank; a new folder must be given one here (checked)."""
PURE_LAYERS = {"algorithms"}
"""Also no file I/O and no environment changes."""
NO_TRACKING_LAYERS = {"algorithms", "decoding", "training", "data"}
"""Below the plumbing: no MLflow, Prefect or DVC."""
TRACKING_PACKAGES = {"mlflow", "prefect", "dvc", "tasks", "flows"}
FILE_IO_NAMES = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink", "rmtree", "mkstemp",
                 "mkdtemp", "environ", "putenv", "chdir", "dump", "to_parquet", "savefig"}


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0]


def _modules_in(layers: set[str]) -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if _layer(p) in layers)


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


def test_every_folder_is_a_layer():
    unranked = {_layer(p) for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"} - set(LAYERS)
    assert not unranked, f"give these folders a rank in LAYERS: {sorted(unranked)}"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for each import of a peer layer or a higher one (a folder's own modules are fine)."""
    found = []
    for module, targets in sorted(graph.items()):
        if module == "onpolicy_core":
            continue
        layer = _layer_of_module(module)
        for target in sorted(targets):
            other = _layer_of_module(target)
            if other != layer and LAYERS[other] >= LAYERS[layer]:
                found.append(f"{module} -> {target}")
    return found


def test_imports_run_down_the_layers():
    assert not upward_imports(import_graph())


def test_upward_finder_finds_an_upward_import():
    graph = {"onpolicy_core.algorithms.ddt": {"onpolicy_core.plumbing.config"},
             "onpolicy_core.training.sft": {"onpolicy_core.decoding.generation", "onpolicy_core.algorithms.losses"},
             "onpolicy_core.stages.eval": {"onpolicy_core.stages.skeleton", "onpolicy_core.data.io"}}
    assert upward_imports(graph) == ["onpolicy_core.algorithms.ddt -> onpolicy_core.plumbing.config",
                                     "onpolicy_core.training.sft -> onpolicy_core.decoding.generation"]


@pytest.mark.parametrize("path", _modules_in(NO_TRACKING_LAYERS), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layers_below_the_plumbing_do_no_tracking_or_orchestration(path):
    assert not _hits(_imports(path), TRACKING_PACKAGES)


@pytest.mark.parametrize("path", _modules_in(PURE_LAYERS), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_algorithms_do_no_file_io_and_change_no_environment(path):
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id in FILE_IO_NAMES:
            used.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr in FILE_IO_NAMES:
            used.add(node.attr)
    assert not used, f"{path.relative_to(ROOT)} does file I/O or changes the environment: {sorted(used)}"


def test_library_never_imports_prefect_layers():
    for path in PACKAGE.rglob("*.py"):
        assert not _hits(_imports(path), {"tasks", "flows", "prefect"}), path


def test_tasks_and_flows_only_sequence_stages():
    for folder in ("tasks", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not _hits(_imports(path), {"torch", "transformers", "onpolicy_core.algorithms.ddt", "onpolicy_core.algorithms.hinted", "onpolicy_core.algorithms.losses"}), path


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _layer_of_module(module: str) -> str:
    """onpolicy_core.algorithms.ddt -> algorithms; onpolicy_core.cli -> cli.py."""
    top = module.split(".")[1]
    return top if (PACKAGE / top).is_dir() else top + ".py"


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
    for path in _modules_in({"data"}):
        assert not _hits(_imports(path), {"onpolicy_core.plumbing"}), path
