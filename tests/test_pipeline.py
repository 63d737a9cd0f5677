"""The wrappers: CLI, DVC and the Prefect flow run the same stage functions, and DVC decides what is stale."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def _cli(*args, cwd=ROOT, env=None):
    return subprocess.run([str(BIN / "onpolicy"), *args], cwd=cwd, capture_output=True, text=True, env=env)


def test_cli_lists_every_stage():
    out = _cli("--help").stdout
    for stage in ("model", "data", "score", "realign", "train"):
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
def project(tmp_path):
    """A throwaway copy of the DVC project with a small data section."""
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "onpolicy_core", tmp_path / "onpolicy_core", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["data"]["arithmetic"]["n"] = 30
    params["data"]["n_eval"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env)
    return tmp_path


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
    first = pipeline(project_dir=str(project), stages=["data"])
    assert first[0]["stage"] == "data"
    outs = first[0]["outs"]
    assert {"artifacts/data/train.jsonl", "artifacts/data/eval.jsonl"} <= set(outs) and all(outs.values())
    assert len((project / "artifacts/data/train.jsonl").read_text().splitlines()) == 25
    assert json.loads((project / "artifacts/data/summary.json").read_text())["eval"] == 5
    mtime = (project / "artifacts/data/train.jsonl").stat().st_mtime_ns
    again = pipeline(project_dir=str(project), stages=["data"])
    assert again[0]["outs"] == outs
    assert (project / "artifacts/data/train.jsonl").stat().st_mtime_ns == mtime, "DVC skipped the unchanged stage"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
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
