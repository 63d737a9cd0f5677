"""MLflow around a stage: one run per stage execution, with the resolved config, metrics and
artefacts. The tracking URI is MLFLOW_TRACKING_URI when set, else a local SQLite file.

A pipeline run (`pipeline_run`, used by `onpolicy repro` and the Prefect flow) is a parent MLflow
run; stage runs nest under it through ONPOLICY_PARENT_RUN_ID. Every stage run is tagged with the
git commit and with the DVC hash of each input it read (from dvc.lock), so a number in the UI leads
back to the exact code and data. An unreachable tracking server fails the stage at once with a
clear message, or falls back to the local store when `tracking.fallback_to_local` is set.
"""

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

from onpolicy_core.plumbing.config import TrackingConfig

log = logging.getLogger(__name__)


def _as_params(obj: dict) -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys, lists and mappings as JSON, values cut at 500
    characters (MLflow caps a param at 6000; the full settings are logged as an artefact)."""
    return {k: str(json.dumps(v) if isinstance(v, (list, dict)) else v)[:500] for k, v in _flatten(obj).items()}


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

    def share_view(self, key: str, view: dict) -> str | None:
        """Store a runs-table view (filter, columns, order) in the run's experiment, where MLflow's UI
        opens it for everyone at the returned `#/experiments/<id>/runs?viewStateShareKey=<key>`
        (the UI's own views are kept in each browser)."""
        if not self._mlflow:
            return None
        experiment = self._mlflow.active_run().info.experiment_id
        self._mlflow.MlflowClient().set_experiment_tag(experiment, f"{SHARED_VIEW_PREFIX}{key}", json.dumps(view))
        return f"#/experiments/{experiment}/runs?viewStateShareKey={key}"


SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
"""MLflow 3's UI reads a shared runs-table view from the experiment tag of this prefix + key (plain JSON)."""


PARENT_ENV = "ONPOLICY_PARENT_RUN_ID"
DVC_STAGE_ENV = "ONPOLICY_DVC_STAGE"
"""Set by the Prefect task to the DVC stage it runs; becomes the `onpolicy.dvc_stage` tag."""


class TrackingUnavailable(RuntimeError):
    """The configured MLflow tracking server does not answer."""


HTTP_RETRIES, HTTP_TIMEOUT_S = "2", "30"
"""MLflow client retries and per-request timeout (its defaults retry for minutes on a failing server)."""


def _server_answers(uri: str, timeout: float) -> str | None:
    """None when the server answers a real API call (not only /health: a server whose database is
    down answers /health and fails every API call with 503), else why not."""
    import urllib.error
    import urllib.request

    base = uri.rstrip("/")
    for path in ("/health", "/api/2.0/mlflow/experiments/get?experiment_id=0"):
        try:
            with urllib.request.urlopen(f"{base}{path}", timeout=timeout) as response:
                if response.status != 200:
                    return f"HTTP {response.status} from {path}"
        except urllib.error.HTTPError as exc:
            if path == "/health" or exc.code >= 500:  # a 404 from the API is an answer
                return f"HTTP {exc.code} from {path}"
        except (urllib.error.URLError, OSError) as exc:
            return str(getattr(exc, "reason", exc))
    return None


def tracking_uri(tracking: TrackingConfig) -> tuple[str, bool]:
    """(URI to log to, whether it is the local fallback). A remote server is probed first, so an
    outage is one clear error within `connect_timeout_s`, not minutes of client retries."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.local_uri
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_RETRIES)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
        problem = _server_answers(uri, tracking.connect_timeout_s)
        if problem:
            if tracking.fallback_to_local:
                log.warning("MLflow server %s unreachable (%s); logging to %s instead", uri, problem, tracking.local_uri)
                return tracking.local_uri, True
            raise TrackingUnavailable(
                f"MLflow server {uri} is not reachable ({problem}). Start it (infra/scripts/mlflow_server.sh), unset "
                "MLFLOW_TRACKING_URI to log locally, or set tracking.fallback_to_local=true")
    return uri, False


_PREPARED_STORES: set[str] = set()


def prepare_sqlite_store(uri: str) -> None:
    """Create or upgrade a SQLite tracking store once, under a file lock: stages that start together
    on a new store would otherwise race through its schema migrations and fail. Once per process."""
    if uri in _PREPARED_STORES:
        return
    import mlflow
    from filelock import FileLock

    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=300):
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    _PREPARED_STORES.add(uri)


def _connect(tracking: TrackingConfig) -> tuple[Any, bool]:
    """(the mlflow module pointed at the tracking store, whether that store is the local fallback)."""
    import mlflow

    uri, fell_back = tracking_uri(tracking)
    if uri.startswith("sqlite:///"):
        prepare_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow, fell_back


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""MLflow 3 opens an experiment without this tag in its GenAI (traces) view; with it, in the runs table."""


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artefacts: `mlruns/` beside a local SQLite store, so that they
    stay with their runs wherever the process starts (MLflow's default, `./mlruns`, follows the working
    directory); a server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def use_experiment(mlflow: Any, name: str) -> str:
    """Set the active experiment (created if new, its artefacts beside a local store), marked as model
    training; returns its id."""
    if mlflow.get_experiment_by_name(name) is None:
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # another process made it first
            mlflow.create_experiment(name, artifact_location=artifact_root(mlflow.get_tracking_uri()))
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_orphaned_runs(client: Any, experiment_id: str, run_name: str) -> list[str]:
    """Runs of `run_name` left RUNNING by a process of this host that is gone (kill -9, power loss):
    marked KILLED, so the UI never shows a dead stage as running. Returns their ids."""
    import socket

    host = socket.gethostname()
    query = f"attributes.status = 'RUNNING' and tags.`mlflow.runName` = '{run_name}' and tags.`onpolicy.host` = '{host}'"
    closed = []
    for run in client.search_runs([experiment_id], query, max_results=100):
        pid = run.data.tags.get("onpolicy.pid", "")
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            client.set_tag(run.info.run_id, "onpolicy.closed_by", f"next start of {run_name} (process {pid} was gone)")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.warning("closed %d MLflow run(s) of %s left RUNNING by a killed process: %s", len(closed), run_name, closed)
    return closed


def dvc_lock_hashes(paths: list[str | Path], lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """DVC content hash of each path as recorded in dvc.lock (as some stage's output or dependency);
    a file DVC does not know is hashed here, so every input gets a tag."""
    from onpolicy_core.data.io import file_sha256
    from onpolicy_core.plumbing.dvc_lock import known_hashes

    known = known_hashes(lock_file)
    out = {}
    for path in map(str, paths):
        rel = os.path.relpath(path) if os.path.isabs(path) else path
        if rel in known:
            out[rel] = known[rel]
        elif Path(path).is_file():
            out[rel] = "sha256:" + file_sha256(path)
    return out


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


def _log_params_file(client: Any, run_id: str, path: Path) -> None:
    """params.yaml as run params (dotted keys), so the runs table compares pipeline runs by setting."""
    import yaml
    from mlflow.entities import Param

    params = _as_params(yaml.safe_load(path.read_text()) or {})
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])  # the client sends them in batches of 100


def log_metrics_to(run_id: str, metrics: dict[str, float], tracking: TrackingConfig) -> None:
    """Log `metrics` on another (finished) run, e.g. eval scores on the model's training run."""
    if not tracking.enabled:
        return
    mlflow, _ = _connect(tracking)
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
    mlflow, _ = _connect(tracking)
    if _existing(mlflow, run_id):
        for path in paths:
            mlflow.MlflowClient().log_artifact(run_id, str(path), artifact_path)


def _common_tags(fell_back: bool) -> dict[str, str]:
    import socket

    tags = {"onpolicy.host": socket.gethostname(), "onpolicy.pid": str(os.getpid())}
    if commit := git_commit():
        tags["git.commit"] = commit
    if dvc_stage := os.environ.get(DVC_STAGE_ENV):
        tags["onpolicy.dvc_stage"] = dvc_stage
    if fell_back:
        tags["onpolicy.tracking_fallback"] = "true"
    return tags


def register_model(run_id: str, name: str, tags: dict[str, Any], tracking: TrackingConfig,
                   artifact_path: str = "model") -> str | None:
    """Register the model folder logged on run `run_id` as a new version of `name` in the MLflow
    model registry, tagged (e.g. with its eval metrics). Returns the version, or None when the run
    or its logged model is not in this store."""
    if not tracking.enabled:
        return None
    mlflow, _ = _connect(tracking)
    if not _existing(mlflow, run_id):
        return None
    client = mlflow.MlflowClient()
    if not client.list_artifacts(run_id, artifact_path):
        log.warning("run %s has no logged %r (train.log_model off?); not registering %s", run_id, artifact_path, name)
        return None
    try:
        client.create_registered_model(name, description="On-Policy SFT training runs of one <method>-<data> choice")
    except mlflow.exceptions.MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    return version.version


@contextlib.contextmanager
def pipeline_run(tracking: TrackingConfig, name: str = "pipeline", tags: dict[str, str] | None = None) -> Iterator[str | None]:
    """The parent MLflow run of one pipeline execution. Stage processes started inside the block
    nest under it (ONPOLICY_PARENT_RUN_ID); params.yaml and, at the end, dvc.lock are its artefacts."""
    if not tracking.enabled:
        yield None
        return
    mlflow, fell_back = _connect(tracking)
    experiment_id = use_experiment(mlflow, tracking.experiment)
    client = mlflow.MlflowClient()
    close_orphaned_runs(client, experiment_id, name)
    run = client.create_run(experiment_id, run_name=name,
                            tags={"onpolicy.stage": "pipeline", "mlflow.runName": name, **_common_tags(fell_back), **(tags or {})})
    run_id = run.info.run_id
    if Path("params.yaml").exists():
        client.log_artifact(run_id, "params.yaml")
        _log_params_file(client, run_id, Path("params.yaml"))
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous
        if Path("dvc.lock").exists():
            client.log_artifact(run_id, "dvc.lock")
        if status == "FINISHED" and not client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1):
            # No stage ran: every output was up to date. Say so, so this run is not taken for a result.
            client.set_tag(run_id, "onpolicy.noop", "true")
            client.set_tag(run_id, "mlflow.runName", f"{name} (no-op: every stage up to date)")
        client.set_terminated(run_id, status)


@contextlib.contextmanager
def stage_run(stage: str, config: dict, tracking: TrackingConfig, run_name: str | None = None,
              parent_run_id: str | None = None, inputs: list[str | Path] = ()) -> Iterator[StageRun]:
    """Open an MLflow run for `stage` and log its resolved `config` as params and as `config.json`.

    The run nests under `parent_run_id` when given (e.g. eval under the model's training run), else
    under ONPOLICY_PARENT_RUN_ID (the pipeline run) when set. `inputs` become `dvc.input.*` tags.
    """
    if not tracking.enabled:
        yield StageRun(None)
        return
    mlflow, fell_back = _connect(tracking)
    close_orphaned_runs(mlflow.MlflowClient(), use_experiment(mlflow, tracking.experiment), run_name or stage)
    parent = _existing(mlflow, parent_run_id) or _existing(mlflow, os.environ.get(PARENT_ENV))
    tags = {"onpolicy.stage": stage, **_common_tags(fell_back),
            **{f"dvc.input.{p}"[:250]: h for p, h in dvc_lock_hashes(list(inputs)).items()}}
    with mlflow.start_run(run_name=run_name or stage, nested=bool(parent), parent_run_id=parent or None, tags=tags) as run:
        mlflow.log_params(_as_params(config))
        mlflow.log_dict(config, "config.json")
        handle = StageRun(mlflow)
        handle.run_id = run.info.run_id
        yield handle
