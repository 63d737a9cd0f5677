"""MLflow plumbing without a server: input tags from dvc.lock, nesting under a parent run, and the
pipeline run's status and artefacts."""

import dataclasses
import os

import mlflow
import pytest
import yaml

from onpolicy_core.plumbing.tracking import dvc_lock_hashes, pipeline_run, stage_run
from tests.conftest import default_config

TRACKING = dataclasses.replace(default_config().tracking, experiment="test-tracking")


def test_input_hashes_come_from_dvc_lock_or_are_computed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "model": {"outs": [{"path": "artifacts/model", "md5": "abc.dir"}]},
        "data": {"deps": [{"path": "src.jsonl", "md5": "f00"}], "outs": [{"path": "artifacts/data/train.jsonl", "md5": "d41"}]},
    }}))
    (tmp_path / "mine.txt").write_text("x")
    hashes = dvc_lock_hashes(["artifacts/model", tmp_path / "artifacts/data/train.jsonl", "mine.txt", "absent.txt"])
    assert hashes["artifacts/model"] == "abc.dir"
    assert hashes["artifacts/data/train.jsonl"] == "d41"
    assert hashes["mine.txt"].startswith("sha256:2d711642")
    assert "absent.txt" not in hashes


def test_stage_runs_nest_under_the_pipeline_run_with_input_tags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("paths: {}\n")
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"model": {"outs": [{"path": "artifacts/model", "md5": "abc.dir"}]}}}))
    with pipeline_run(TRACKING, name="p") as parent:
        assert os.environ["ONPOLICY_PARENT_RUN_ID"] == parent
        with stage_run("score", {"x": 1}, TRACKING, inputs=["artifacts/model"]) as run:
            child = run.run_id
    assert "ONPOLICY_PARENT_RUN_ID" not in os.environ
    client = mlflow.MlflowClient()
    tags = client.get_run(child).data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["dvc.input.artifacts/model"] == "abc.dir"
    assert client.get_run(parent).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent)} == {"params.yaml", "dvc.lock"}
    experiment = client.get_experiment(client.get_run(parent).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development", "the UI opens on the runs table"


def test_a_pipeline_run_that_ran_nothing_says_so_and_carries_the_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  idft: {beta: 0.5}\n  runs: [a, b]\n")
    with pipeline_run(TRACKING, name="nothing") as idle:
        pass
    run = mlflow.MlflowClient().get_run(idle)
    assert run.data.tags["onpolicy.noop"] == "true" and "no-op" in run.data.tags["mlflow.runName"]
    assert run.data.params["train.idft.beta"] == "0.5" and run.data.params["train.runs"] == '["a", "b"]'


def test_a_failing_pipeline_run_is_marked_failed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError), pipeline_run(TRACKING, name="boom") as parent:
        raise RuntimeError("stage failed")
    assert mlflow.MlflowClient().get_run(parent).info.status == "FAILED"
