"""Prefect tasks around DVC: one stage (`dvc repro --single-item`) and one experiment (`dvc exp run`).

DVC decides whether a stage is stale; Prefect only retries and times out. No Prefect result caching.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefect import get_run_logger, task

from onpolicy_core.dvc_lock import stage_outs
from onpolicy_core.tracking import DVC_STAGE_ENV


def _env(stage: str | None = None) -> dict[str, str]:
    """PATH with this interpreter's bin first, so `dvc` and the stage commands (`onpolicy ...`)
    resolve to the project's environment even when the worker was started without activating it."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if stage:
        env[DVC_STAGE_ENV] = stage
    return env


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


GRACE_S = 10
"""After a timeout or cancel: seconds between SIGTERM and SIGKILL of the stage's process group."""


def end_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group (dvc and every command it started), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _run(cmd: list[str], project: Path, stage: str | None, what: str) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group. A Prefect timeout or cancel raises in this thread while it
    waits (the wait polls, so the exception is delivered at once); the whole group then ends, so no
    stage command outlives its task. Output goes to files, not pipes, so a long wait cannot fill them."""
    logger = get_run_logger()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=project, env=_env(stage), stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            while True:
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    continue
        except BaseException:
            logger.warning("%s interrupted: ending its process group %d", what, proc.pid)
            end_process_group(proc)
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    for line in (stdout + stderr).splitlines()[-40:]:
        logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {proc.returncode}:\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


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
