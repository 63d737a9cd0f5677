"""Scale-out through Prefect (docs/scale.md), against a real Prefect server with the project's `shard`
deployment on a process work pool and 2 workers: `<stage>.workers: 2` gives the bytes of a one-process
run (realign through `dvc repro`, score and eval through their DVC command), a shard killed mid-run is
resubmitted and resumes, and a shard that fails every retry fails the stage in one line naming the
shard and its log, with nothing merged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, ROOT, bin_env, make_project
from tests.test_servers import _free_port, _post, _server

pytestmark = pytest.mark.service

SMALL = {"data.arithmetic.n": 14, "data.n_eval": 4, "realign.backend": "hf", "realign.decoding.max_new_tokens": 8,
         "realign.batch_size": 2, "realign.work_unit": 2, "score.work_unit": 4, "eval.limit": 3, "eval.max_new_tokens": 12, "eval.work_unit": 2, "tracking.registry": False,
         "scale.poll_s": 0.5,
         "model.prime.enabled": "off"}  # scale-out is tested here, priming in test_prime_stage and the pipeline tests
REALIGN = Path("artifacts/realign/hinted")
REALIGN_FILES = ("records.jsonl", "train.jsonl", "summary.json", "metrics.json")


@pytest.fixture(scope="module")
def scaled(tmp_path_factory, embedded_model_dir):
    """(project, env, api): a project with its model and data in place, a Prefect server, the `shard`
    deployment and two process workers that take one shard at a time."""
    project = make_project(tmp_path_factory.mktemp("scale"), **SMALL)
    state = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = bin_env(PWD=str(project), PREFECT_HOME=str(state / "home"), PREFECT_SERVER_PORT=str(port), PREFECT_API_URL=api,
                  MLFLOW_TRACKING_URI=f"sqlite:///{state / 'mlflow.db'}", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                  PREFECT_WORKER_QUERY_SECONDS="1")
    # The workers keep the stage's own thread count: fp32 matmuls sum in a thread-count-dependent
    # order, so workers with OMP_NUM_THREADS=1 differ from a 2-thread run in the 7th digit of phi.
    worker_env = env
    shutil.copytree(embedded_model_dir, project / "artifacts" / "model")
    for cmd in (["dvc", "commit", "-f", "-q", "model"], ["dvc", "repro", "-q", "data"]):  # the model as if `dvc repro model` made it
        done = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    with _server(["bash", str(ROOT / "infra/scripts/prefect_server.sh")], f"{api}/health", env, state / "server.log"):
        for step in (["work-pool", "create", "onpolicy-local", "--type", "process"], ["--no-prompt", "deploy", "-n", "shard"]):
            done = subprocess.run([str(BIN / "prefect"), *step], cwd=project, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        workers = [subprocess.Popen(["bash", str(ROOT / "infra/scripts/prefect_worker.sh"), "--limit", "1"], cwd=project, env=worker_env,
                                    stdout=(state / f"worker{i}.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
                   for i in range(2)]
        try:
            yield project, env, api
        finally:
            for w in workers:
                os.killpg(w.pid, signal.SIGTERM)
            for w in workers:
                try:
                    w.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(w.pid, signal.SIGKILL)
                    w.wait(timeout=15)


def _run(project, env, *cmd, timeout=600):
    return subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


def _set_params(project, **settings):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in settings.items():
        section, name = key.split(".")
        params[section][name] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def _snapshot(folder: Path, names) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names}


def _shard_runs(api: str, stage: str) -> dict[str, list[str]]:
    """flow run name -> states of every run of it, oldest first."""
    runs = _post(f"{api}/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})
    found: dict[str, list[str]] = {}
    for r in runs:
        if r["name"].startswith(f"{stage}-shard-"):
            found.setdefault(r["name"], []).append(r["state_type"])
    return found


def test_realign_with_two_workers_through_dvc_gives_the_bytes_of_one_even_with_a_shard_killed(scaled):
    """`dvc repro` with realign.workers 2 writes the bytes of workers 1; shard 0's process is killed after
    its first unit: the fan-out resubmits it, it resumes, and no byte changes."""
    project, env, api = scaled
    done = _run(project, env, "dvc", "repro", "realign@hinted")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one = _snapshot(project / REALIGN, REALIGN_FILES)
    _set_params(project, **{"realign.workers": 2})
    status = _run(project, env, "dvc", "status", "--json", "realign@hinted")
    assert json.loads(status.stdout) == {}, "workers changes no output, so DVC must not call the stage stale"
    partial = project / "artifacts/.realign.partial/hinted"
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "--force", "--single-item", "realign@hinted"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if (partial / "unit-00000.jsonl").exists():  # shard 0 (units 0-1 of 5) has finished its first unit
            victim = _pid_of("--shard 0 --num-shards 2")
    assert victim is not None, "shard 0 was never seen running"
    os.kill(victim, signal.SIGKILL)
    problems = len((project / "artifacts/data/train.jsonl").read_text().splitlines())
    for unit in partial.glob("unit-*.jsonl"):  # a worker that dies leaves only whole units where the merge reads
        index = int(unit.stem.split("-")[1])
        assert len([json.loads(line) for line in unit.read_text().splitlines()]) == min(2, problems - 2 * index)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert _snapshot(project / REALIGN, REALIGN_FILES) == one
    runs = _shard_runs(api, "realign")
    assert runs == {"realign-shard-0-of-2": ["FAILED", "COMPLETED"], "realign-shard-1-of-2": ["COMPLETED"]}, runs
    record = json.loads((project / "artifacts/.runs/realign/hinted.json").read_text())
    assert set(record["shards"]) == {"shard-0-of-2", "shard-1-of-2"}
    assert record["shards"]["shard-0-of-2"]["units_resumed"] >= 1, "the resubmitted shard resumed after its finished units"


def _pid_of(fragment: str) -> int | None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if fragment in cmdline and "bin/onpolicy realign" in cmdline:
                return int(proc.name)
    return None


def test_score_and_eval_with_two_workers_give_the_bytes_of_one(scaled):
    project, env, api = scaled
    score_cmd = ["onpolicy-sharded", "score", "--input", "artifacts/data/train.jsonl", "--output", "artifacts/score/original"]
    eval_cmd = ["onpolicy-sharded", "eval", "--model", "base"]
    for cmd, folder, names in ((score_cmd, "artifacts/score/original", ("scores.parquet", "selected.jsonl", "summary.json", "phi.png")),
                               (eval_cmd, "artifacts/eval/base", ("records.parquet", "summary.json", "metrics.json"))):
        done = _run(project, env, *cmd)
        assert done.returncode == 0, done.stderr[-3000:]
        one = _snapshot(project / folder, names)
        shutil.rmtree(project / folder)
        done = _run(project, env, *cmd, "--set", f"{cmd[1]}.workers=2")
        assert done.returncode == 0, done.stderr[-3000:]
        assert _snapshot(project / folder, names) == one, cmd
    assert set(_shard_runs(api, "eval")) == {"eval-shard-0-of-2", "eval-shard-1-of-2"}


def test_a_shard_that_fails_every_retry_fails_the_stage_in_one_line(scaled):
    project, env, _ = scaled
    cmd = ["onpolicy", "score", "--input", "artifacts/data/train.jsonl", "--output", "artifacts/score/faulty"]
    done = _run(project, env, *cmd, "--shard", "0", "--num-shards", "2")  # makes the work folder, as a first worker would
    assert done.returncode == 0, done.stderr[-2000:]
    partial = project / "artifacts/.score.partial/faulty"
    units = sorted(partial.glob("unit-*.jsonl"))
    (partial / f"unit-{len(units):05d}.jsonl").mkdir()  # shard 1's first unit cannot be written (a broken disk, say)
    done = _run(project, env, "onpolicy-sharded", *cmd[1:], "--set", "score.workers=2", "--set", "scale.shard_retries=1")
    assert done.returncode == 2
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: score: shard 1 of 2 failed 2 time(s) (FAILED: "), line
    log = line.rsplit("log: ", 1)[1]
    assert "IsADirectoryError" in (project / log).read_text() and (project / log).read_text().count("=== ") == 2
    assert not (project / "artifacts/score/faulty").exists(), "no merged output"
