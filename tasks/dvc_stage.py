"""Prefect task that runs one DVC stage. DVC decides whether it is stale; Prefect retries it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import get_run_logger, task


def _env() -> dict[str, str]:
    """PATH with this interpreter's bin first, so `dvc` and the stage commands (`onpolicy ...`)
    resolve to the project's environment even when the worker was started without activating it."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def locked_outs(project_dir: Path, stage: str) -> dict[str, str]:
    """Output path -> content hash of `stage` as recorded in dvc.lock."""
    lock = project_dir / "dvc.lock"
    if not lock.exists():
        return {}
    entry = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage, {})
    return {o["path"]: o.get("md5") or o.get("hash", "") for o in entry.get("outs", [])}


@task(name="dvc-stage", retries=2, retry_delay_seconds=5, timeout_seconds=3600, task_run_name="dvc repro {stage}")
def run_dvc_stage(stage: str, project_dir: str = ".") -> dict:
    """`dvc repro --single-item <stage>`: runs it only if DVC finds it stale. Returns its locked outputs."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "--single-item", stage],
        cwd=project,
        env=_env(),
        capture_output=True,
        text=True,
    )
    for line in (proc.stdout + proc.stderr).splitlines()[-40:]:
        logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro {stage} failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}")
    return {"stage": stage, "outs": locked_outs(project, stage)}
