"""Prefect flow: the DVC pipeline, one task per stage in dependency order, inside one MLflow run.

`dvc repro` and this flow give the same result: each task is `dvc repro --single-item <stage>`, so
DVC stays the one judge of what is stale and Prefect adds retries, per-stage timeouts and a run
history. The flow opens the pipeline's parent MLflow run; each stage's run nests under it. The
comparison report becomes a Prefect markdown artifact (Prefect UI -> the flow run -> Artifacts).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import networkx as nx
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from onpolicy_core.plumbing.config import load_params
from onpolicy_core.plumbing.tracking import pipeline_run
from onpolicy_core.stages.skeleton import read_run_record
from tasks.dvc_stage import run_dvc_stage

STAGE_TIMEOUTS_S = {
    "model": 3600, "data": 3600, "prime": 4 * 3600, "tune": 24 * 3600, "score": 4 * 3600, "realign": 12 * 3600, "train": 24 * 3600,
    "eval-base": 12 * 3600, "eval": 12 * 3600, "general-base": 4 * 3600, "general": 4 * 3600, "report": 600,
}
"""Per-stage timeout by stage name (the part before '@'); the paper-scale settings need the long ones."""


def stage_order(project_dir: str | Path = ".") -> list[str]:
    """Stage names of `dvc.yaml` with every stage after the stages it depends on."""
    from dvc.repo import Repo

    with Repo(str(project_dir)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        return [stage.name for stage in nx.topological_sort(graph.reverse())]


def _prefect_run_tags() -> dict[str, str]:
    from prefect.runtime import flow_run

    return {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)} if flow_run.id else {}


@flow(name="onpolicy-pipeline", log_prints=True)
def pipeline(project_dir: str = ".", stages: list[str] | None = None, timeouts: dict[str, int] | None = None) -> list[dict]:
    """Run the DVC pipeline stage by stage (all stages, or only `stages`, kept in DAG order).

    Returns, per stage: whether DVC ran it, its output hashes from dvc.lock and its MLflow run id.
    """
    project = Path(project_dir).resolve()
    order = stage_order(project)
    if stages:
        unknown = sorted(set(stages) - set(order))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
        order = [s for s in order if s in stages]
    limits = STAGE_TIMEOUTS_S | (timeouts or {})
    params = load_params(project / "params.yaml")
    results = []
    with contextlib.chdir(project), pipeline_run(params.tracking, name="pipeline (prefect)", tags=_prefect_run_tags()) as parent:
        for stage in order:
            task = run_dvc_stage.with_options(timeout_seconds=limits.get(stage.split("@")[0], 3600))
            results.append(task(stage, str(project), parent))
    report = project / params.paths.report / "report.md"
    ran = [r["stage"] for r in results if r["ran"]]
    if report.exists():  # the report of the pipeline's current state, whether or not it reran now
        made_by = read_run_record(project / params.paths.report / "report").get("mlflow_run_id")
        create_markdown_artifact(report.read_text(encoding="utf-8"), key="onpolicy-report",
                                 description=f"Comparison report of {project.name}, made by MLflow run {made_by} "
                                             f"({'rerun by' if 'report' in ran else 'up to date before'} this flow's run {parent})")
    print(f"{len(ran)} of {len(results)} stages ran ({', '.join(ran) or 'all up to date'}); MLflow parent run {parent}")
    return results


if __name__ == "__main__":
    pipeline(project_dir=os.environ.get("ONPOLICY_PROJECT_DIR", "."))
