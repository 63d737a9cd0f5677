"""Prefect flow: the DVC pipeline, one task per stage in dependency order.

`dvc repro` and this flow give the same result: each task is `dvc repro --single-item <stage>`, so
DVC stays the one judge of what is stale and Prefect adds retries, timeouts and a run history.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
from prefect import flow

from tasks.dvc_stage import run_dvc_stage


def stage_order(project_dir: str | Path = ".") -> list[str]:
    """Stage names of `dvc.yaml` with every stage after the stages it depends on."""
    from dvc.repo import Repo

    with Repo(str(project_dir)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        return [stage.name for stage in nx.topological_sort(graph.reverse())]


@flow(name="onpolicy-pipeline", log_prints=True)
def pipeline(project_dir: str = ".", stages: list[str] | None = None) -> list[dict]:
    """Run the DVC pipeline stage by stage (all stages, or only `stages`, kept in DAG order)."""
    order = stage_order(project_dir)
    if stages:
        unknown = sorted(set(stages) - set(order))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
        order = [s for s in order if s in stages]
    return [run_dvc_stage(stage, project_dir) for stage in order]


if __name__ == "__main__":
    pipeline()
