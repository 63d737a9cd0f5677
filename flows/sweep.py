"""Prefect flow: a parameter sweep as DVC experiments (`dvc exp run -S ...`), one task each.

The default grid is the IDFT temperature beta; pass any grid of dotted params.yaml keys, e.g.

    sweep(grid={"train.idft.beta": [0.5, 1.0, 2.0], "train.idft.gamma_max": [1.5, 2.0]},
          targets=["eval@idft-original"])

DVC reruns only what each combination changes (here the IDFT runs and their evaluations).

Each combination is one DVC experiment; compare them with `dvc exp show` or in the MLflow UI.
Experiments run one after another: they share the workspace and, on one machine, the hardware.
"""

from __future__ import annotations

import itertools
import json
import os

from prefect import flow

from tasks.dvc_stage import run_dvc_experiment

DEFAULT_GRID = {"train.idft.beta": [0.5, 1.0, 2.0]}


def combinations(grid: dict[str, list]) -> list[list[str]]:
    """Every combination of the grid as `key=value` overrides (values in YAML/JSON syntax)."""
    keys = list(grid)
    return [[f"{k}={json.dumps(v)}" for k, v in zip(keys, values)] for values in itertools.product(*(grid[k] for k in keys))]


def experiment_name(overrides: list[str]) -> str:
    """A readable DVC experiment name, e.g. 'runs-idft-original_beta-0.5' (DVC allows [A-Za-z0-9_.-])."""
    parts = []
    for override in overrides:
        key, value = override.split("=", 1)
        value = json.loads(value)
        shown = "+".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{key.split('.')[-1]}-{shown}")
    return "".join(c if c.isalnum() or c in "-_.+" else "-" for c in "_".join(parts)).replace("+", "-")[:80]


@flow(name="onpolicy-sweep", log_prints=True)
def sweep(grid: dict[str, list] | None = None, project_dir: str = ".", targets: list[str] | None = None) -> list[dict]:
    """Run one DVC experiment per grid combination (optionally only up to `targets` stages)."""
    results = []
    for overrides in combinations(grid or DEFAULT_GRID):
        results.append(run_dvc_experiment(experiment_name(overrides), overrides, project_dir, targets))
    print(f"{len(results)} experiments: {[r['name'] for r in results]}")
    return results


if __name__ == "__main__":
    sweep(project_dir=os.environ.get("ONPOLICY_PROJECT_DIR", "."))
