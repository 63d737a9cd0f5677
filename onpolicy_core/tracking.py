"""MLflow around a stage: one run per stage execution, with the resolved config, metrics and
artefacts. The tracking URI is MLFLOW_TRACKING_URI when set, else a local SQLite file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onpolicy_core.config import TrackingConfig

log = logging.getLogger(__name__)


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


def _connect(tracking: TrackingConfig):
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or tracking.local_uri)
    return mlflow


def _existing(mlflow: Any, run_id: str | None) -> str | None:
    """`run_id` if this tracking store has it (a store switched since it was recorded does not)."""
    if not run_id:
        return None
    try:
        mlflow.MlflowClient().get_run(run_id)
        return run_id
    except mlflow.exceptions.MlflowException:
        log.warning("MLflow run %s is not in this tracking store; not nesting under it", run_id)
        return None


def log_metrics_to(run_id: str, metrics: dict[str, float], tracking: TrackingConfig) -> None:
    """Log `metrics` on another (finished) run, e.g. eval scores on the model's training run."""
    if not tracking.enabled:
        return
    mlflow = _connect(tracking)
    if not _existing(mlflow, run_id):
        return
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    clean = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]
    mlflow.MlflowClient().log_batch(run_id, metrics=clean)


def log_artifacts_to(run_id: str, paths: list[Path], tracking: TrackingConfig, artifact_path: str | None = None) -> None:
    """Log files on another run, e.g. the report on the pipeline's parent run."""
    if not tracking.enabled:
        return
    mlflow = _connect(tracking)
    if _existing(mlflow, run_id):
        for path in paths:
            mlflow.MlflowClient().log_artifact(run_id, str(path), artifact_path)


@contextlib.contextmanager
def stage_run(stage: str, config: dict, tracking: TrackingConfig, run_name: str | None = None,
              parent_run_id: str | None = None) -> Iterator[StageRun]:
    """Open an MLflow run for `stage` and log its resolved `config` as params and as `config.json`.

    The run nests under `parent_run_id` when given (e.g. eval under the model's training run), else
    under ONPOLICY_PARENT_RUN_ID (the pipeline run) when set.
    """
    if not tracking.enabled:
        yield StageRun(None)
        return
    mlflow = _connect(tracking)
    mlflow.set_experiment(tracking.experiment)
    parent = _existing(mlflow, parent_run_id) or _existing(mlflow, os.environ.get("ONPOLICY_PARENT_RUN_ID"))
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
