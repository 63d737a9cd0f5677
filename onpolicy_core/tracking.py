"""MLflow around a stage: one run per stage execution, with the resolved config, metrics and
artefacts. The tracking URI is MLFLOW_TRACKING_URI when set, else a local SQLite file."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onpolicy_core.config import TrackingConfig


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class StageRun:
    """Handle given to a stage body: log metrics and artefacts to the active run (or nowhere)."""

    def __init__(self, mlflow_module: Any | None):
        self._mlflow = mlflow_module
        self.run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow:
            clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        if self._mlflow:
            self._mlflow.log_artifacts(str(folder), artifact_path=artifact_path)

    def log_dict(self, obj: dict, name: str) -> None:
        if self._mlflow:
            self._mlflow.log_dict(obj, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow:
            self._mlflow.set_tags(tags)


@contextlib.contextmanager
def stage_run(stage: str, config: dict, tracking: TrackingConfig, run_name: str | None = None) -> Iterator[StageRun]:
    """Open an MLflow run for `stage` and log its resolved `config` as params and as `config.json`.

    A parent run id in ONPOLICY_PARENT_RUN_ID nests the stage run under a pipeline run.
    """
    if not tracking.enabled:
        yield StageRun(None)
        return
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or tracking.local_uri)
    mlflow.set_experiment(tracking.experiment)
    parent = os.environ.get("ONPOLICY_PARENT_RUN_ID")
    tags = {"onpolicy.stage": stage}
    if commit := git_commit():
        tags["git.commit"] = commit
    with mlflow.start_run(run_name=run_name or stage, nested=bool(parent), parent_run_id=parent or None, tags=tags) as run:
        params = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in _flatten(config).items()}
        # MLflow caps a param value at 6000 chars; the full config is the artifact below.
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_dict(config, "config.json")
        handle = StageRun(mlflow)
        handle.run_id = run.info.run_id
        yield handle
