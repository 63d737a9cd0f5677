"""The eval stage on the embedded model (HF and vLLM backends): files, metrics, MLflow nesting under
the training run, and resume after a kill; the report stage from recorded results."""

import json
import os

import mlflow
import pandas as pd
import pytest

from onpolicy_core.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    PathsConfig,
    ReportConfig,
    TrackingConfig,
)
from onpolicy_core.data.arithmetic import generate
from onpolicy_core.io import InputError, write_json, write_jsonl
from onpolicy_core.stages import eval as eval_stage
from onpolicy_core.stages.report import comparison, run_report

RUN = "idft-original"
TRACKING = TrackingConfig(enabled=True, experiment="test-eval")


def _project(tmp_path, model_dir, training_run_id=None):
    paths = PathsConfig(model=str(model_dir), data=str(tmp_path / "data"), train=str(tmp_path / "train"),
                        eval=str(tmp_path / "eval"), score=str(tmp_path / "score"), report=str(tmp_path / "report"))
    write_jsonl(tmp_path / "data" / "eval.jsonl", (p.to_dict() for p in generate(3, 2, 2, 9, seed=7)))
    run_dir = tmp_path / "train" / RUN
    run_dir.mkdir(parents=True)
    (run_dir / "model").symlink_to(model_dir)  # stands in for a trained model: same files
    write_json(run_dir / "summary.json", {"run": RUN, "mlflow_run_id": training_run_id})
    return paths


def _cfg(**kw):
    base = dict(benchmarks=["arithmetic", "arithmetic_ood"], limit=3, samples=2, max_new_tokens=16, batch_size=8)
    return EvalConfig(**(base | kw))


@pytest.mark.slow
def test_eval_writes_records_and_metrics_and_nests_under_the_training_run(tmp_path, embedded_model_dir):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment(TRACKING.experiment)
    with mlflow.start_run(run_name="train-fake") as train_run:
        mlflow.log_text("weights would be here", "model/README.txt")  # what train.log_model logs
    paths = _project(tmp_path, embedded_model_dir, train_run.info.run_id)
    metrics = eval_stage.run_eval(_cfg(), paths, TRACKING, ModelConfig(), DataConfig(), RUN)
    out = tmp_path / "eval" / RUN
    records = pd.read_parquet(out / "records.parquet")
    assert len(records) == 2 * 3 * (1 + 2)  # benchmarks x problems x (greedy + 2 samples)
    assert set(records["mode"]) == {"greedy", "sample"}
    assert records["n_tokens"].max() <= 16
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for m in metrics.values():
        assert {"greedy_accuracy", "avg_at_k", "pass_at_1", "pass_at_2", "no_answer_rate", "truncated_rate"} <= set(m)
        assert m["pass_at_1"] <= m["pass_at_2"]
    client = mlflow.MlflowClient()
    children = client.search_runs([train_run.info.experiment_id], f"tags.mlflow.parentRunId = '{train_run.info.run_id}'")
    assert [r.data.tags["mlflow.runName"] for r in children] == [f"eval-{RUN}"]
    assert "arithmetic/greedy_accuracy" in children[0].data.metrics
    on_training_run = client.get_run(train_run.info.run_id).data.metrics
    assert on_training_run["eval/arithmetic_ood/avg_at_k"] == pytest.approx(metrics["arithmetic_ood"]["avg_at_k"])
    assert not (tmp_path / "eval" / f".{RUN}.partial").exists()
    versions = client.search_model_versions(f"name = 'test-eval-{RUN}'")
    assert [v.run_id for v in versions] == [train_run.info.run_id]
    assert float(versions[0].tags["eval.arithmetic.greedy_accuracy"]) == pytest.approx(metrics["arithmetic"]["greedy_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_killed_eval_resumes_from_finished_benchmarks(tmp_path, embedded_model_dir, monkeypatch):
    paths = _project(tmp_path, embedded_model_dir)
    cfg, off = _cfg(samples=0), TrackingConfig(enabled=False)
    real = eval_stage.evaluate_benchmark
    calls, kill = [], {"at": 2}

    def dies_on_second(generator, tokenizer, benchmark, problems, cfg):
        calls.append(benchmark)
        if len(calls) == kill["at"]:
            raise KeyboardInterrupt("killed")
        return real(generator, tokenizer, benchmark, problems, cfg)

    monkeypatch.setattr(eval_stage, "evaluate_benchmark", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        eval_stage.run_eval(cfg, paths, off, ModelConfig(), DataConfig(), "base")
    assert not (tmp_path / "eval" / "base" / "metrics.json").exists(), "no half-written output"
    calls.clear()
    kill["at"] = None
    metrics = eval_stage.run_eval(cfg, paths, off, ModelConfig(), DataConfig(), "base")
    assert calls == ["arithmetic_ood"], "the finished benchmark is read back, not recomputed"
    assert set(metrics) == {"arithmetic", "arithmetic_ood"}


@pytest.mark.slow
def test_vllm_backend_matches_hf_greedy_accuracy(tmp_path, embedded_model_dir):
    pytest.importorskip("vllm")
    paths = _project(tmp_path, embedded_model_dir)
    off = TrackingConfig(enabled=False)
    cfg = _cfg(benchmarks=["arithmetic"], samples=2, max_new_tokens=24)
    hf = eval_stage.run_eval(cfg, paths, off, ModelConfig(), DataConfig(), "base")
    hf_records = pd.read_parquet(tmp_path / "eval" / "base" / "records.parquet")
    vl = eval_stage.run_eval(EvalConfig(**(vars(cfg) | {"backend": "vllm"})), paths, off, ModelConfig(), DataConfig(), "base")
    vl_records = pd.read_parquet(tmp_path / "eval" / "base" / "records.parquet")
    assert len(vl_records) == len(hf_records) == 3 * 3
    greedy = lambda r: r[r["mode"] == "greedy"]["response"].tolist()  # noqa: E731
    same = sum(a == b for a, b in zip(greedy(hf_records), greedy(vl_records)))
    assert same >= 2, (greedy(hf_records), greedy(vl_records))  # near-ties may flip one (see test_generation)
    assert set(vl["arithmetic"]) == set(hf["arithmetic"])


def _fake_eval(paths, name, acc):
    write_json(f"{paths.eval}/{name}/metrics.json",
               {b: {"greedy_accuracy": a, "avg_at_k": a / 2, "pass_at_4": min(1.0, a * 2), "problems": 10} for b, a in acc.items()})


def test_report_renders_from_recorded_results(tmp_path, monkeypatch):
    paths = PathsConfig(eval=str(tmp_path / "eval"), score=str(tmp_path / "score"), report=str(tmp_path / "report"))
    _fake_eval(paths, "base", {"arithmetic": 0.10, "gsm8k": 0.05})
    _fake_eval(paths, "sft-original", {"arithmetic": 0.40, "gsm8k": 0.04})
    _fake_eval(paths, "idft-hinted", {"arithmetic": 0.55, "gsm8k": 0.07})
    for data, phi in (("original", -0.29), ("hinted", -0.03)):
        write_json(f"{paths.score}/{data}/summary.json",
                   {"examples": 64, "avg_phi": {"mean": phi, "std": 0.1}, "token_phi": {"frac_pos": 0.8, "frac_phi_gt_-1": 0.9}})
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment(TRACKING.experiment)
    with mlflow.start_run(run_name="pipeline") as parent:
        pass
    monkeypatch.setenv("ONPOLICY_PARENT_RUN_ID", parent.info.run_id)
    out = run_report(ReportConfig(metric="greedy"), paths, TRACKING, EvalConfig(samples=4), ["sft-original", "idft-hinted"])
    cell = out["table"]["idft-hinted"]["arithmetic"]
    assert cell["value"] == 0.55 and cell["vs_base"] == pytest.approx(0.45) and cell["vs_sft"] == pytest.approx(0.15)
    assert out["table"]["sft-original"]["arithmetic"]["vs_sft"] is None
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| idft-hinted | -0.030 | 55.0 (+45.0 / +15.0) | 7.0 (+2.0 / +3.0) |" in md
    assert "| hinted | 64 | -0.030 |" in md
    assert (tmp_path / "report" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "report")}
    assert artifacts == {"report/report.md", "report/comparison.png", "report/comparison.json"}
    pass_k = run_report(ReportConfig(metric="pass@k"), paths, TrackingConfig(enabled=False), EvalConfig(samples=4), ["sft-original"])
    assert pass_k["table"]["base"]["arithmetic"]["value"] == pytest.approx(0.2)


def test_report_without_an_evaluation_names_the_missing_file(tmp_path):
    paths = PathsConfig(eval=str(tmp_path / "eval"), report=str(tmp_path / "report"))
    _fake_eval(paths, "base", {"arithmetic": 0.1})
    with pytest.raises(InputError, match=r"dft-original/metrics.json"):
        run_report(ReportConfig(), paths, TrackingConfig(enabled=False), EvalConfig(), ["dft-original"])


def test_comparison_deltas_by_hand():
    results = {"base": {"b": {"m": 0.2}}, "sft-original": {"b": {"m": 0.5}}, "dft-original": {"b": {"m": 0.6}}}
    t = comparison(results, "m", "sft-original")
    assert t["base"]["b"] == {"value": 0.2, "vs_base": None, "vs_sft": None}
    assert t["dft-original"]["b"]["vs_base"] == pytest.approx(0.4)
    assert t["dft-original"]["b"]["vs_sft"] == pytest.approx(0.1)
