"""Real servers on loopback, started by the project's own scripts (infra/scripts): an MLflow tracking
server that a pipeline run logs to and that is read back over its REST API, a tracking outage that
fails fast (or falls back when configured), and a Prefect server with the project's deployments, a
worker, and a triggered flow run checked through the Prefect API."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager

import pytest
import yaml

from tests.conftest import BIN, ROOT, bin_env

pytestmark = pytest.mark.service
SCRIPTS = ROOT / "infra" / "scripts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"{}")


@contextmanager
def _server(cmd: list[str], health: str, env: dict, log_path, timeout_s: float = 150):
    """Start a server in its own process group, wait for `health`, and stop the whole group after."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                _get(health, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not come up:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    state = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = bin_env(MLFLOW_PORT=str(port), MLFLOW_STATE_DIR=str(state))
    with _server(["bash", str(SCRIPTS / "mlflow_server.sh")], f"http://127.0.0.1:{port}/health", env, state / "server.log"):
        yield f"http://127.0.0.1:{port}"


def test_pipeline_logs_to_a_real_mlflow_server_and_reads_back_over_rest(project, mlflow_server):
    result = subprocess.run([str(BIN / "onpolicy"), "repro", "data"], cwd=project, capture_output=True, text=True,
                            env=bin_env(MLFLOW_TRACKING_URI=mlflow_server))
    assert result.returncode == 0, result.stderr[-3000:]
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = json.loads(_get(f"{api}/experiments/get-by-name?experiment_name=onpolicy-sft"))["experiment"]
    runs = _post(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    by_stage = {t["onpolicy.stage"]: (r, t) for r, t in zip(runs, tags)}
    parent, parent_tags = by_stage["pipeline"]
    data_run, data_tags = by_stage["data"]
    assert parent["info"]["status"] == "FINISHED" and data_run["info"]["status"] == "FINISHED"
    assert data_tags["mlflow.parentRunId"] == parent["info"]["run_id"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert data_tags["git.commit"] == head
    metrics = {m["key"]: m["value"] for m in data_run["data"]["metrics"]}
    assert metrics["train_examples"] == 25 and metrics["eval_examples"] == 5
    listed = json.loads(_get(f"{api}/artifacts/list?run_id={data_run['info']['run_id']}"))
    assert {"summary.json", "config.json"} <= {f["path"] for f in listed["files"]}
    summary = json.loads(_get(f"{mlflow_server}/get-artifact?path=summary.json&run_uuid={data_run['info']['run_id']}"))
    assert summary["train"] == 25
    parent_files = json.loads(_get(f"{api}/artifacts/list?run_id={parent['info']['run_id']}"))
    assert {"params.yaml", "dvc.lock"} <= {f["path"] for f in parent_files["files"]}


def test_tracking_server_down_fails_fast_or_falls_back(project, tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    result = subprocess.run([str(BIN / "onpolicy"), "data"], cwd=project, capture_output=True, text=True,
                            env=bin_env(MLFLOW_TRACKING_URI=dead))
    assert result.returncode == 2 and "not reachable" in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - start < 60
    assert not (project / "artifacts" / "data" / "train.jsonl").exists(), "nothing written without tracking"
    local = f"sqlite:///{tmp_path / 'fallback.db'}"
    result = subprocess.run([str(BIN / "onpolicy"), "data", "--set", "tracking.fallback_to_local=true", "--set", f"tracking.local_uri={local}"],
                            cwd=project, capture_output=True, text=True, env=bin_env(MLFLOW_TRACKING_URI=dead))
    assert result.returncode == 0, result.stderr[-2000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=local)
    (run,) = client.search_runs([client.get_experiment_by_name("onpolicy-sft").experiment_id])
    assert run.data.tags["onpolicy.tracking_fallback"] == "true"


def readme_prefect_steps() -> list[str]:
    """The commands of the README's Prefect block, in order, without comments and the shell set-up."""
    text = (ROOT / "README.md").read_text()
    block = text.split("### Prefect: what you see", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    steps = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [s for s in steps if s and not s.startswith(("source ", "export "))]


def test_prefect_server_deployment_worker_and_flow_run(project, tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    # PWD: prefect.yaml's pull step runs flows in the checkout `prefect deploy` was run from.
    env = bin_env(PWD=str(project), PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_PORT=str(port), PREFECT_API_URL=api,
                  MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    with _server(["bash", str(SCRIPTS / "prefect_server.sh")], f"{api}/health", env, tmp_path / "prefect.log"):
        def prefect(*args, timeout=300):
            return subprocess.run([str(BIN / "prefect"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)

        # The project copy's on-demand deployment runs the data stage only (the README's runs them all).
        deploy_config = yaml.safe_load((project / "prefect.yaml").read_text())
        for deployment in deploy_config["deployments"]:
            if deployment["name"] == "on-demand":
                deployment["parameters"]["stages"] = ["data"]
        (project / "prefect.yaml").write_text(yaml.safe_dump(deploy_config, sort_keys=False))
        steps = readme_prefect_steps()
        assert steps[0] == "infra/scripts/prefect_server.sh &" and steps[-2] == "infra/scripts/prefect_worker.sh &"
        worker_done = None
        for step in steps[1:]:
            if step.startswith("prefect "):
                result = prefect(*shlex.split(step)[1:])
                assert result.returncode == 0, (step, result.stdout[-3000:] + result.stderr[-3000:])
            if step.startswith("prefect --no-prompt deploy"):
                deployments = {d["name"]: d for d in _post(f"{api}/deployments/filter", {})}
                assert set(deployments) == {"nightly", "on-demand", "beta-sweep", "shard"}
                assert [s["schedule"]["cron"] for s in deployments["nightly"]["schedules"]] == ["0 2 * * *"]
            if step.startswith("prefect deployment run"):  # the README's background worker, here polling once
                worker_done = subprocess.run(["bash", str(SCRIPTS / "prefect_worker.sh"), "--run-once"], cwd=project, env=env,
                                             capture_output=True, text=True, timeout=600)
        assert worker_done is not None and worker_done.returncode == 0, worker_done.stdout[-3000:] + worker_done.stderr[-3000:]
        runs = _post(f"{api}/flow_runs/filter", {"deployments": {"id": {"any_": [deployments["on-demand"]["id"]]}}})
        assert [r["state_type"] for r in runs] == ["COMPLETED"], [r["state"] for r in runs]
        assert (project / "artifacts" / "data" / "train.jsonl").exists()
