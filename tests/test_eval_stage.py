"""The eval stage on the embedded model (HF and vLLM backends): files, metrics, MLflow nesting under
the training run, and resume after a kill. The report stage: tests/test_report.py."""

import dataclasses
import json
import os

import mlflow
import pandas as pd
import pytest

from onpolicy_core.data.arithmetic import generate
from onpolicy_core.data.io import write_jsonl
from onpolicy_core.plumbing.tracking import use_experiment
from onpolicy_core.stages import eval as eval_stage
from onpolicy_core.stages.skeleton import partial_dir, write_run_record
from tests.conftest import KilledOnCall, default_config

RUN = "idft-original"
BASE = default_config()
TRACKING = dataclasses.replace(BASE.tracking, enabled=True, experiment="test-eval")
OFF = dataclasses.replace(BASE.tracking, enabled=False)
MODEL, DATA = BASE.model, BASE.data


def _project(tmp_path, model_dir, training_run_id=None):
    paths = dataclasses.replace(BASE.paths, model=str(model_dir), policy=str(model_dir), data=str(tmp_path / "data"), train=str(tmp_path / "train"),
                                eval=str(tmp_path / "eval"), score=str(tmp_path / "score"), report=str(tmp_path / "report"))
    write_jsonl(tmp_path / "data" / "eval.jsonl", (p.to_dict() for p in generate(3, 2, 2, 9, seed=7)))
    run_dir = tmp_path / "train" / RUN
    run_dir.mkdir(parents=True)
    (run_dir / "model").symlink_to(model_dir)  # stands in for a trained model: same files
    write_run_record(run_dir, {"mlflow_run_id": training_run_id})  # what the train stage records
    return paths


def _cfg(**kw):
    base = dict(benchmarks=["arithmetic", "arithmetic_ood"], limit=3, samples=2, max_new_tokens=16, batch_size=8, backend="hf")
    return dataclasses.replace(BASE.eval, **(base | kw))


def test_eval_writes_records_and_metrics_and_nests_under_the_training_run(tmp_path, embedded_model_dir):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    use_experiment(mlflow, TRACKING.experiment)
    with mlflow.start_run(run_name="train-fake") as train_run:
        mlflow.log_text("weights would be here", "model/README.txt")  # what train.log_model logs
    paths = _project(tmp_path, embedded_model_dir, train_run.info.run_id)
    metrics = eval_stage.run_eval(_cfg(), paths, TRACKING, MODEL, DATA, RUN)
    out = tmp_path / "eval" / RUN
    records = pd.read_parquet(out / "records.parquet")
    assert len(records) == 2 * 3 * (1 + 2)  # benchmarks x problems x (greedy + 2 samples)
    assert set(records["mode"]) == {"greedy", "sample"}
    assert records["n_tokens"].max() <= 16
    assert json.loads((out / "summary.json").read_text())["benchmarks"] == metrics
    assert json.loads((out / "metrics.json").read_text()) == {
        b: {k: m[k] for k in ("greedy_accuracy", "strict_greedy_accuracy", "avg_at_k")} for b, m in metrics.items()}
    for m in metrics.values():
        assert {"greedy_accuracy", "strict_greedy_accuracy", "avg_at_k", "strict_avg_at_k", "pass_at_1", "pass_at_2",
                "no_answer_rate", "truncated_rate"} <= set(m)
        assert m["pass_at_1"] <= m["pass_at_2"]
        assert m["strict_greedy_accuracy"] <= m["greedy_accuracy"] and m["strict_avg_at_k"] <= m["avg_at_k"]
    assert not (records["strict_correct"] & records["boxed"].isna()).any(), "strict: no \\boxed{}, never correct"
    client = mlflow.MlflowClient()
    children = client.search_runs([train_run.info.experiment_id], f"tags.mlflow.parentRunId = '{train_run.info.run_id}'")
    assert [r.data.tags["mlflow.runName"] for r in children] == [f"eval-{RUN}"]
    assert "arithmetic/greedy_accuracy" in children[0].data.metrics
    on_training_run = client.get_run(train_run.info.run_id).data.metrics
    assert on_training_run["eval/arithmetic_ood/avg_at_k"] == pytest.approx(metrics["arithmetic_ood"]["avg_at_k"])
    assert not partial_dir(out).exists() and not any(p.name.endswith(".partial") for p in (tmp_path / "eval").iterdir())
    eval_stage.run_eval(_cfg(), paths, TRACKING, MODEL, DATA, "base")
    evals = client.search_runs([train_run.info.experiment_id], "tags.`onpolicy.stage` = 'eval'")
    assert sorted(r.data.tags["onpolicy.model"] for r in evals) == ["base", RUN]
    keys = [{k for k in r.data.metrics if "/" in k} for r in evals]
    assert keys[0] == keys[1] and "arithmetic/greedy_accuracy" in keys[0], "every model under the same metric keys"
    assert {r.data.tags["onpolicy.method"] for r in evals} == {"base", "idft"}
    versions = client.search_model_versions(f"name = 'test-eval-{RUN}'")
    assert [v.run_id for v in versions] == [train_run.info.run_id]
    assert float(versions[0].tags["eval.arithmetic.greedy_accuracy"]) == pytest.approx(metrics["arithmetic"]["greedy_accuracy"], abs=1e-6)


def test_killed_eval_resumes_from_finished_benchmarks(tmp_path, embedded_model_dir, monkeypatch):
    paths = _project(tmp_path, embedded_model_dir)
    cfg, off = _cfg(samples=0), OFF
    real = eval_stage.evaluate_benchmark
    killed = KilledOnCall(real, kill_at=2)
    monkeypatch.setattr(eval_stage, "evaluate_benchmark", killed)
    with pytest.raises(KeyboardInterrupt):
        eval_stage.run_eval(cfg, paths, off, MODEL, DATA, "base")
    assert not (tmp_path / "eval" / "base" / "metrics.json").exists(), "no half-written output"
    killed.reset()
    metrics = eval_stage.run_eval(cfg, paths, off, MODEL, DATA, "base")
    assert [args[2] for args in killed.args] == ["arithmetic_ood"], "the finished benchmark is read back, not recomputed"
    assert set(metrics) == {"arithmetic", "arithmetic_ood"}
    resumed = json.loads((tmp_path / "eval" / "base" / "summary.json").read_text())
    monkeypatch.setattr(eval_stage, "evaluate_benchmark", real)
    eval_stage.run_eval(cfg, paths, off, MODEL, DATA, "base")
    straight = json.loads((tmp_path / "eval" / "base" / "summary.json").read_text())
    assert resumed["generated_tokens"] == straight["generated_tokens"], "tokens of the resumed benchmarks counted too"


def test_eval_of_a_missing_model_fails_before_leaving_anything(tmp_path, embedded_model_dir):
    from onpolicy_core.data.io import InputError

    paths = _project(tmp_path, embedded_model_dir)
    with pytest.raises(InputError, match=r"no model for 'dft-original'; run `dvc repro train@dft-original`"):
        eval_stage.run_eval(_cfg(), paths, OFF, MODEL, DATA, "dft-original")
    assert not (tmp_path / "eval").exists() and not partial_dir(tmp_path / "eval" / "dft-original").exists()


def test_vllm_backend_matches_hf_greedy_accuracy(tmp_path, embedded_model_dir):
    pytest.importorskip("vllm")
    paths = _project(tmp_path, embedded_model_dir)
    off = OFF
    cfg = _cfg(benchmarks=["arithmetic"], samples=2, max_new_tokens=24)
    hf = eval_stage.run_eval(cfg, paths, off, MODEL, DATA, "base")
    hf_records = pd.read_parquet(tmp_path / "eval" / "base" / "records.parquet")
    vl = eval_stage.run_eval(dataclasses.replace(cfg, backend="vllm"), paths, off, MODEL, DATA, "base")
    vl_records = pd.read_parquet(tmp_path / "eval" / "base" / "records.parquet")
    assert len(vl_records) == len(hf_records) == 3 * 3
    greedy = lambda r: r[r["mode"] == "greedy"]["response"].tolist()
    same = sum(a == b for a, b in zip(greedy(hf_records), greedy(vl_records)))
    assert same >= 2, (greedy(hf_records), greedy(vl_records))  # near-ties may flip one (see test_generation)
    assert set(vl["arithmetic"]) == set(hf["arithmetic"])


def test_a_benchmark_declared_only_in_params_evaluates(tmp_path, embedded_model_dir):
    rows = [{"ID": f"s{i}", "Body": f"Ann has {i} apples and gets 2 more.", "Question": "How many apples does she have?",
             "Answer": f"{i + 2} (apples)"} for i in range(3)]
    bench = tmp_path / "svamp.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = (f"{{mine: {{path: {bench}, format: fields, question_template: '{{Body}} {{Question}}', answer_normalization: strip_units, "
            "fields: {question: Question, solution: null, answer: Answer, id: ID}}}")
    p = default_config(f"eval.custom_benchmarks={spec}", "eval.benchmarks=[mine]", "eval.limit=2", "eval.limit_order=first",
                       "eval.max_new_tokens=16", "eval.backend=hf")
    paths = _project(tmp_path, embedded_model_dir)
    metrics = eval_stage.run_eval(p.eval, paths, OFF, MODEL, DATA, "base")
    records = pd.read_parquet(tmp_path / "eval" / "base" / "records.parquet")
    assert set(metrics) == {"mine"} and metrics["mine"]["problems"] == 2
    assert list(records["problem_id"]) == ["s0", "s1"] and list(records["gold"]) == ["2", "3"]
