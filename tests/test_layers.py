"""Layers point one way: algorithms (tensors in, tensors out) know nothing of files, tracking or
orchestration; the library knows nothing of Prefect tasks and flows."""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

ALGORITHM_MODULES = ["ddt.py", "hinted.py", "losses.py", "grading.py", "prompts.py", "records.py", "data/arithmetic.py",
                     "training/preference.py", "training/sft.py", "evaluation.py", "statistics.py", "generation.py", "hinted_vllm.py"]
FORBIDDEN_IN_ALGORITHMS = {"mlflow", "prefect", "dvc", "onpolicy_core.stages", "onpolicy_core.io", "onpolicy_core.tracking", "tasks", "flows"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _hits(names: set[str], forbidden: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("module", ALGORITHM_MODULES)
def test_algorithm_modules_do_no_io_or_orchestration(module):
    assert not _hits(_imports(ROOT / "onpolicy_core" / module), FORBIDDEN_IN_ALGORITHMS)


def test_library_never_imports_prefect_layers():
    for path in (ROOT / "onpolicy_core").rglob("*.py"):
        assert not _hits(_imports(path), {"tasks", "flows", "prefect"}), path


def test_tasks_and_flows_only_sequence_stages():
    for folder in ("tasks", "flows"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not _hits(_imports(path), {"torch", "transformers", "onpolicy_core.ddt", "onpolicy_core.hinted", "onpolicy_core.losses"}), path

