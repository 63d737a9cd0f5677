"""Prefect tasks around DVC: one stage (`dvc repro --single-item`) and one experiment (`dvc exp run`).

DVC decides whether a stage is stale; Prefect only retries and times out. No Prefect result caching.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from prefect import get_run_logger, task

from onpolicy_core.plumbing.dvc_lock import stage_outs
from tasks.process_group import project_env, run_in_process_group


def stage_mlflow_run(stage: str, parent_run_id: str | None) -> str | None:
    """The MLflow run the stage opened under the pipeline run (None when DVC skipped it)."""
    if not parent_run_id:
        return None
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`onpolicy.dvc_stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _run(cmd: list[str], project: Path, stage: str | None, what: str) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group (ended whole on a Prefect timeout or cancel); its output
    goes to the task log, and a non-zero exit raises with the end of its stderr."""
    logger = get_run_logger()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        returncode = run_in_process_group(cmd, project, project_env(stage), out, err, logger, what)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    for line in (stdout + stderr).splitlines()[-40:]:
        logger.info(line)
    if returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {returncode}:\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(cmd, returncode, stdout, stderr)


def _stale(project: Path, stage: str) -> bool:
    """Does `dvc status --json` list the stage (changed deps, params, outs, or never run)?"""
    proc = _run([sys.executable, "-m", "dvc", "status", "--json", stage], project, None, f"dvc status {stage}")
    return stage in json.loads(proc.stdout or "{}")


@task(name="dvc-stage", retries=2, retry_delay_seconds=5, timeout_seconds=3600, task_run_name="dvc repro {stage}")
def run_dvc_stage(stage: str, project_dir: str = ".", parent_run_id: str | None = None) -> dict:
    """`dvc repro --single-item <stage>`: runs it only if DVC finds it stale. Returns whether it ran,
    its locked output hashes and the MLflow run it logged to."""
    project = Path(project_dir).resolve()
    stale = _stale(project, stage)
    _run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], project, stage, f"dvc repro {stage}")
    if _stale(project, stage):
        raise RuntimeError(f"dvc repro {stage} finished but `dvc status` still lists the stage as changed")
    ran = stale  # stale before and up to date after: DVC ran it; up to date before: DVC skipped it
    return {"stage": stage, "ran": ran, "outs": stage_outs(project / "dvc.lock", stage),
            "mlflow_run_id": stage_mlflow_run(stage, parent_run_id) if ran else None}


@task(name="dvc-experiment", retries=1, retry_delay_seconds=5, timeout_seconds=24 * 3600, task_run_name="dvc exp run {name}")
def run_dvc_experiment(name: str, set_params: list[str], project_dir: str = ".", targets: list[str] | None = None) -> dict:
    """`dvc exp run -n <name> -S k=v ... [targets]`; returns the experiment's params and metrics."""
    project = Path(project_dir).resolve()
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "--name", name, *[a for kv in set_params for a in ("-S", kv)], *(targets or [])]
    _run(cmd, project, None, f"dvc exp run {name}")
    shown = _run([sys.executable, "-m", "dvc", "exp", "show", "--json"], project, None, "dvc exp show")
    return {"name": name, "set": set_params, "experiments": _experiment_results(json.loads(shown.stdout), name)}


def _experiment_results(shown: list[dict], name: str) -> dict:
    """Params and metrics of experiment `name` from `dvc exp show --json`."""
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs", []):
                if revision.get("name") == name:
                    data = revision.get("data", {})
                    return {"params": data.get("params", {}), "metrics": data.get("metrics", {})}
    return {}
