"""The score stage on the embedded model: files, summary, selection, MLflow, and resume after a kill."""

import json

import pandas as pd
import pytest

from onpolicy_core.algorithms import ddt
from onpolicy_core.data.io import InputError
from onpolicy_core.stages import score as score_stage
from onpolicy_core.stages.skeleton import partial_dir
from tests.conftest import KilledOnCall, arithmetic_corpus, default_config


@pytest.fixture
def corpus(tmp_path):
    return arithmetic_corpus(tmp_path / "train.jsonl", 10, 2, 3, 12, seed=5)


def test_score_stage_writes_scores_summary_plot_and_selection(tmp_path, corpus, embedded_model_dir):
    import mlflow

    p = default_config("score.select_top_k=3", "score.max_batch_size=4", f"paths.model={embedded_model_dir}", f"paths.policy={embedded_model_dir}")
    cfg = p.score
    out = tmp_path / "score" / "original"
    summary = score_stage.run_score(cfg, p.paths, p.tracking, corpus, out)
    df = pd.read_parquet(out / "scores.parquet")
    assert len(df) == 10 and (df["n_tokens"] > 0).all()
    assert all(len(phi) == n for phi, n in zip(df["phi"], df["n_tokens"]))
    assert (df["avg_phi"] < 0).mean() > 0.5, "reference solutions sit off the model's distribution"
    assert summary["avg_phi"]["q50"] == pytest.approx(df["avg_phi"].median())
    assert sum(summary["histograms"]["token_phi"]["counts"]) == summary["tokens"] == df["n_tokens"].sum()
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert {r["id"] for r in selected} == set(df.nlargest(3, "avg_phi")["id"])
    assert summary["selection"] == {"threshold": None, "top_k": 3, "input": 10, "selected": 3}
    assert (out / "phi.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "metrics.json").read_text()) == {"examples": summary["scored_examples"],
                                                               "avg_phi": pytest.approx(summary["avg_phi"]["mean"])}
    run = mlflow.search_runs(experiment_names=["onpolicy-sft"], filter_string="tags.`onpolicy.stage` = 'score'").iloc[0]
    assert run["metrics.avg_phi.mean"] == pytest.approx(summary["avg_phi"]["mean"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"])}
    assert {"summary.json", "phi.png", "config.json"} <= artifacts


def test_killed_score_run_resumes_from_its_shards(tmp_path, corpus, embedded_model_dir, monkeypatch):
    p = default_config("score.max_batch_size=4", "score.work_unit=4", f"paths.model={embedded_model_dir}", f"paths.policy={embedded_model_dir}", "tracking.enabled=false")
    cfg, paths, tracking = p.score, p.paths, p.tracking
    real = ddt.score_batch
    killed = KilledOnCall(real, kill_at=3)
    monkeypatch.setattr(ddt, "score_batch", killed)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        score_stage.run_score(cfg, paths, tracking, corpus, out)
    assert not (out / "scores.parquet").exists(), "no half-written output"
    assert len(list(partial_dir(tmp_path / "resumed").glob("unit-*.jsonl"))) == 2
    killed.reset()  # no more kills; count the batches the resumed run needs
    score_stage.run_score(cfg, paths, tracking, corpus, out)
    assert killed.calls == 1, "only the last unit (2 examples, one batch) is recomputed"
    monkeypatch.setattr(ddt, "score_batch", real)
    fresh = tmp_path / "fresh"
    score_stage.run_score(cfg, paths, tracking, corpus, fresh)
    a, b = pd.read_parquet(out / "scores.parquet"), pd.read_parquet(fresh / "scores.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert not partial_dir(tmp_path / "resumed").exists()


def test_bad_score_input_names_file_and_line(tmp_path, embedded_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "question": "q", "solution": "s"}) + "\n" + json.dumps({"id": "b", "question": "q"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: record lacks string field\(s\) \['solution'\]"):
        p = default_config(f"paths.model={embedded_model_dir}", f"paths.policy={embedded_model_dir}", "tracking.enabled=false")
        score_stage.run_score(p.score, p.paths, p.tracking, bad, tmp_path / "o")
