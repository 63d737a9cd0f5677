"""The wrappers: CLI, DVC and the Prefect flow run the same stage functions, and DVC decides what is stale."""

import json
import subprocess

import mlflow
import pytest
import yaml

from tests.conftest import BIN, ROOT, bin_env


def _cli(*args, cwd=ROOT, env=None):
    return subprocess.run([str(BIN / "onpolicy"), *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_cli_lists_every_stage():
    out = _cli("--help").stdout
    for stage in ("model", "data", "score", "realign", "train", "eval", "report", "repro"):
        assert f" {stage} " in out
    assert "--thresholds" not in _cli("score", "--help").stdout  # settings live in params.yaml ...
    assert "select_top_k" in _cli("score", "--help").stdout  # ... and the help names them


def test_cli_bad_data_file_names_file_line_and_reason(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n{broken\n')
    result = _cli("data", "--set", f"data.source={bad}", "--set", "data.format=fields",
                  "--set", "tracking.enabled=false", "--set", f"paths.data={tmp_path / 'out'}")
    assert result.returncode != 0
    assert f"{bad}:1: missing_solution" in result.stderr and f"{bad}:2: invalid_json" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture
def prefect_backend(monkeypatch, tmp_path_factory):
    """A real, temporary Prefect API (SQLite) for flows run in-process."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect")))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_prefect_flow_runs_dvc_stages_and_dvc_skips_unchanged_ones(project, prefect_backend):
    from flows.pipeline import pipeline, stage_order

    order = stage_order(project)
    assert order.index("model") < order.index("realign@hinted") < order.index("score@hinted") < order.index("train@idft-hinted")
    assert order.index("data") < order.index("score@original")
    assert order.index("train@sft-original") < order.index("eval@sft-original") < order.index("report")
    assert order.index("eval-base") < order.index("report")
    first = pipeline(project_dir=str(project), stages=["data"])
    assert first[0]["stage"] == "data" and first[0]["ran"]
    stage_run = mlflow.MlflowClient().get_run(first[0]["mlflow_run_id"])
    assert stage_run.data.tags["onpolicy.dvc_stage"] == "data"
    parent = mlflow.MlflowClient().get_run(stage_run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["onpolicy.stage"] == "pipeline" and parent.info.status == "FINISHED"
    outs = first[0]["outs"]
    assert {"artifacts/data/train.jsonl", "artifacts/data/eval.jsonl"} <= set(outs) and all(outs.values())
    assert len((project / "artifacts/data/train.jsonl").read_text().splitlines()) == 25
    assert json.loads((project / "artifacts/data/summary.json").read_text())["eval"] == 5
    mtime = (project / "artifacts/data/train.jsonl").stat().st_mtime_ns
    again = pipeline(project_dir=str(project), stages=["data"])
    assert again[0]["outs"] == outs and not again[0]["ran"] and again[0]["mlflow_run_id"] is None
    assert (project / "artifacts/data/train.jsonl").stat().st_mtime_ns == mtime, "DVC skipped the unchanged stage"
    env = bin_env()
    status = subprocess.run([str(BIN / "dvc"), "status", "data"], cwd=project, capture_output=True, text=True, env=env)
    assert "up to date" in status.stdout
    # Changing a param the stage reads makes DVC rerun it, through plain `dvc repro` too.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["n_eval"] = 6
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run([str(BIN / "dvc"), "repro", "--single-item", "data"], cwd=project, check=True, env=env, capture_output=True)
    assert len((project / "artifacts/data/eval.jsonl").read_text().splitlines()) == 6
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline(project_dir=str(project), stages=["nope"])


FLAKY_STAGE = {
    # Fails on its first attempt (as a killed or preempted stage would), succeeds on the retry.
    "cmd": "test -f .attempted && echo done > flaky.txt || (touch .attempted && exit 1)",
    "outs": ["flaky.txt"],
}


def test_prefect_retry_after_a_transient_stage_failure_completes_the_run(project, prefect_backend):
    from flows.pipeline import pipeline

    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc_yaml["stages"]["flaky"] = FLAKY_STAGE
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    state = pipeline(project_dir=str(project), stages=["flaky"], return_state=True)
    assert state.is_completed(), state
    assert (project / ".attempted").exists() and (project / "flaky.txt").read_text() == "done\n"


def test_repro_opens_one_parent_run_for_the_whole_dvc_repro(project, tmp_path):
    store = f"sqlite:///{tmp_path / 'repro.db'}"
    result = subprocess.run([str(BIN / "onpolicy"), "repro", "data"], cwd=project, capture_output=True, text=True,
                            env=bin_env(MLFLOW_TRACKING_URI=store))
    assert result.returncode == 0, result.stderr[-2000:]
    client = mlflow.MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("onpolicy-sft").experiment_id])
    (parent,) = [r for r in runs if r.data.tags["onpolicy.stage"] == "pipeline"]
    (child,) = [r for r in runs if r.data.tags["onpolicy.stage"] == "data"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert child.data.tags["git.commit"] == head
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"params.yaml", "dvc.lock"}
    assert parent.info.status == "FINISHED"


def test_flow_publishes_the_report_as_a_prefect_artifact(project, prefect_backend):
    from prefect import get_client

    from flows.pipeline import pipeline

    (project / "artifacts" / "report").mkdir(parents=True)
    (project / "artifacts" / "report" / "report.md").write_text("| model | arithmetic |\n|---|---|\n| base | 10.0 |\n")
    pipeline(project_dir=str(project), stages=["data"])

    async def latest():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    import asyncio

    artifacts = {a.key: a for a in asyncio.run(latest())}
    assert "| base | 10.0 |" in artifacts["onpolicy-report"].data


def test_sweep_flow_runs_one_dvc_experiment_per_grid_point(project, prefect_backend):
    from flows.sweep import sweep

    results = sweep(grid={"data.n_eval": [4, 6]}, project_dir=str(project), targets=["data"])
    assert [r["name"] for r in results] == ["n_eval-4", "n_eval-6"]
    evals = [r["experiments"]["metrics"]["artifacts/data/metrics.json"]["data"]["eval"] for r in results]
    assert evals == [4, 6]
    shown = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=project, capture_output=True, text=True, env=bin_env())
    assert "n_eval-4" in shown.stdout and "n_eval-6" in shown.stdout


SLOW_STAGE = {
    # A stage whose command starts a child of its own (as `onpolicy` stages start vLLM workers).
    "cmd": "sleep 41.25 & sleep 42.75; touch late.txt",
    "outs": ["late.txt"],
}


def _stage_processes() -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if "sleep 41.25" in line or "sleep 42.75" in line]


def test_prefect_timeout_ends_every_process_of_the_stage(project, prefect_backend):
    import time

    from prefect import flow

    from tasks.dvc_stage import run_dvc_stage

    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc_yaml["stages"]["slow"] = SLOW_STAGE
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))

    @flow
    def one_slow_stage():
        return run_dvc_stage.with_options(timeout_seconds=4, retries=0)("slow", str(project))

    start = time.monotonic()
    state = one_slow_stage(return_state=True)
    assert state.is_failed() and time.monotonic() - start < 40
    deadline = time.monotonic() + 20
    while _stage_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _stage_processes(), "a process of the timed-out stage is still running"
    time.sleep(2)
    assert not (project / "late.txt").exists(), "the stage wrote its output after its task had timed out"
