"""Tracking under faults: a server whose API fails while /health answers, stage runs left RUNNING
by a killed process, and stages that start together on a new SQLite store."""

from __future__ import annotations

import dataclasses
import http.server
import subprocess
import sys
import threading
import time

import mlflow
import pytest

from onpolicy_core.plumbing.tracking import TrackingUnavailable, stage_run
from tests.conftest import ROOT, default_config

pytestmark = pytest.mark.service
TRACKING = default_config().tracking


class _HealthyButBroken(http.server.BaseHTTPRequestHandler):
    """/health says OK; every API call answers 503 (a server whose database is down)."""

    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()
        self.wfile.write(b"OK" if self.path == "/health" else b"Service Unavailable")

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def broken_server(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthyButBroken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
    yield server
    server.shutdown()


def test_a_server_that_answers_health_but_fails_its_api_is_one_clear_error(broken_server):
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=r"is not reachable \(HTTP 503 from /api/2.0/mlflow/experiments/get"):
        with stage_run("data", {}, TRACKING):
            pass
    assert time.monotonic() - start < 10


def test_the_same_server_falls_back_to_the_local_store_when_allowed(broken_server, tmp_path):
    local = f"sqlite:///{tmp_path / 'fallback.db'}"
    tracking = dataclasses.replace(TRACKING, fallback_to_local=True, local_uri=local, experiment="fallback")
    with stage_run("data", {}, tracking) as run:
        run_id = run.run_id
    assert mlflow.MlflowClient(tracking_uri=local).get_run(run_id).data.tags["onpolicy.tracking_fallback"] == "true"


def test_cli_turns_the_failing_server_into_one_line(broken_server, tmp_path):
    result = subprocess.run([sys.executable, "-m", "onpolicy_core.cli", "data", "--set", f"paths.data={tmp_path / 'd'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: MLflow server http://127.0.0.1:")
    assert not (tmp_path / "d").exists()


KILLED_STAGE = """
import os, signal, sys
from onpolicy_core.plumbing.tracking import stage_run
from tests.conftest import default_config
import dataclasses
tracking = dataclasses.replace(default_config().tracking, experiment="orphans")
with stage_run("score", {}, tracking, run_name="score-original") as run:
    print(run.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_left_running_by_kill_9_is_closed_at_the_next_start(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'orphans.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    killed = subprocess.run([sys.executable, "-c", KILLED_STAGE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "MLFLOW_TRACKING_URI": uri})
    assert killed.returncode == -9
    orphan = killed.stdout.split()[0]
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(orphan).info.status == "RUNNING"
    with stage_run("score", {}, dataclasses.replace(TRACKING, experiment="orphans"), run_name="score-original"):
        pass
    assert client.get_run(orphan).info.status == "KILLED"
    assert "process" in client.get_run(orphan).data.tags["onpolicy.closed_by"]


FIRST_USE = """
import dataclasses, sys
from onpolicy_core.plumbing.tracking import stage_run
from tests.conftest import default_config
tracking = dataclasses.replace(default_config().tracking, experiment="together")
with stage_run(sys.argv[1], {"x": 1}, tracking) as run:
    run.log_metrics({"m": 1.0})
"""


def test_stages_starting_together_on_a_new_sqlite_store_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE, f"stage{i}"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [e[-1500:] for e in errors]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(r.data.tags["onpolicy.stage"] for r in runs) == [f"stage{i}" for i in range(4)]
