"""The report stage from recorded evaluations (no model): n and intervals in every cell, paired tests
against base and SFT, seeds aggregated, the verdict's wording, truncation flags, realignment
rejections and the DDT statistics of all three training sets."""

import dataclasses
import json
import os
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from onpolicy_core.algorithms.statistics import mcnemar_exact, wilson
from onpolicy_core.data.io import InputError, write_json
from onpolicy_core.plumbing.tracking import use_experiment
from onpolicy_core.stages.report import run_report
from tests.conftest import default_config

BASE = default_config()
OFF = dataclasses.replace(BASE.tracking, enabled=False)
REPORT, EVAL = BASE.report, dataclasses.replace(BASE.eval, samples=0, limit=16)

N = 120


def _record(bench, pid, correct, mode="greedy", sample=0, boxed=True, response=None):
    return {"benchmark": bench, "problem_id": f"{bench}-{pid:03d}", "mode": mode, "sample": sample, "correct": correct,
            "strict_correct": correct and boxed, "n_tokens": 10, "finish_reason": "stop", "response": response}


def _fake_eval(paths, name, n_correct: dict[str, int], truncated=0.0, unboxed=0, answers_as=None):
    """Greedy records: the first n_correct problems right (the first `unboxed` of those without \\boxed{}),
    each answer a text of this model's own, or the model `answers_as`'s text."""
    rows = [_record(b, i, i < k, boxed=i >= unboxed, response=f"{answers_as or name} on {i}")
            for b, k in n_correct.items() for i in range(N)]
    folder = f"{paths.eval}/{name}"
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), f"{folder}/records.parquet")
    write_json(f"{folder}/summary.json", {"benchmarks": {b: {"greedy_accuracy": k / N, "problems": N, "truncated_rate": truncated}
                                                         for b, k in n_correct.items()}})


@pytest.fixture
def paths(tmp_path):
    p = dataclasses.replace(BASE.paths, eval=str(tmp_path / "eval"), score=str(tmp_path / "score"),
                            realign=str(tmp_path / "realign"), report=str(tmp_path / "report"))
    _fake_eval(p, "base", {"arithmetic": 30, "arithmetic_ood": 12}, truncated=0.05)
    _fake_eval(p, "sft-original", {"arithmetic": 60, "arithmetic_ood": 20}, truncated=0.05, unboxed=6)
    _fake_eval(p, "idft-original", {"arithmetic": 64, "arithmetic_ood": 22})
    _fake_eval(p, "idft-original-s1", {"arithmetic": 66, "arithmetic_ood": 24})
    _fake_eval(p, "idft-hinted", {"arithmetic": 90, "arithmetic_ood": 21}, truncated=0.40)
    for data, phi in (("original", -0.29), ("self_distill", -0.15), ("hinted", -0.04)):
        write_json(f"{p.score}/{data}/summary.json", {"examples": 64, "scored_examples": 64, "avg_phi": {"mean": phi, "std": 0.1},
                                                       "token_phi": {"frac_pos": 0.8, "frac_phi_gt_-1": 0.9}})
    write_json(f"{p.realign}/hinted/summary.json", {"examples": 32, "verified_rate": 0.5, "eos_rate": 0.75, "mean_tokens": 70,
                                                    "rejections": {"repetitive": 3, "truncated": 5, "no_boxed_answer": 2, "wrong_answer": 6}})
    return p


RUNS = ["sft-original", "idft-original", "idft-original-s1", "idft-hinted"]


def test_report_cells_carry_n_intervals_and_paired_tests(paths, monkeypatch):
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    use_experiment(mlflow, "test-report")
    with mlflow.start_run(run_name="pipeline") as parent:
        pass
    monkeypatch.setenv("ONPOLICY_PARENT_RUN_ID", parent.info.run_id)
    out = run_report(REPORT, paths, dataclasses.replace(BASE.tracking, experiment="test-report"), EVAL, RUNS)
    arith = out["table"]["arithmetic"]
    assert list(arith) == ["base", "sft-original", "idft-original", "idft-hinted"], "seeds of one method are one row"
    sft = arith["sft-original"]
    expected = wilson(60, N)
    assert (sft["estimate"]["value"], sft["estimate"]["low"], sft["estimate"]["high"], sft["estimate"]["n"]) == \
        pytest.approx((expected.value, expected.low, expected.high, N))
    assert sft["strict"]["value"] == pytest.approx(54 / N), "strict accuracy drops the 6 unboxed answers"
    # one greedy run each: exact McNemar on the same problems
    assert sft["vs_base"]["test"] == "exact McNemar"
    assert sft["vs_base"]["p_value"] == pytest.approx(mcnemar_exact([i < 60 for i in range(N)], [i < 30 for i in range(N)]).p_value)
    # two seeds: mean +- sd over seeds, paired bootstrap on the per-problem mean
    idft = arith["idft-original"]
    assert idft["estimate"]["seeds"] == 2 and idft["estimate"]["value"] == pytest.approx(65 / N)
    assert idft["estimate"]["sd"] == pytest.approx(abs(64 - 66) / N / 2**0.5)
    assert idft["vs_sft"]["test"] == "paired bootstrap" and idft["vs_sft"]["p_holm"] >= idft["vs_sft"]["p_value"]
    # the data-level comparison: the same method on realigned against original data (1 seed vs 2: bootstrap)
    hinted = arith["idft-hinted"]["vs_original"]
    assert hinted["test"] == "paired bootstrap" and hinted["diff"] == pytest.approx((90 - 65) / N) and hinted["n"] == N
    assert idft["vs_original"] is None and sft["vs_original"] is None, "only a run on realigned data has a counterpart"

    md = Path(paths.report, "report.md").read_text()
    assert "## arithmetic (n = 120)" in md
    assert "idft-original vs sft-original: +2.5 points, no significant difference (p 0.038, Holm 0.076" in md, "Holm decides"
    assert "idft-hinted vs sft-original: +25.0 points, significantly higher" in md
    assert "idft-hinted vs idft-original (same method, original data): +20.8 points, significantly higher" in md
    assert "idft-original | 2 | 54.2 ± 1.2 sd" in md
    assert "⚠ idft-hinted on arithmetic: truncated_rate 40.0% vs base 5.0%" in md
    assert "Smoke scale" not in md
    assert "| hinted | 32 | 50.0 [" in md and "| 3 | 5 | 2 | 6 |" in md, "realignment rejections by reason"
    for data, paper in (("original", "< -0.1 (ground truth)"), ("self_distill", "< -0.1"), ("hinted", "about -0.05")):
        assert f"| {data} | 64 |" in md and paper in md
    assert Path(paths.report, "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "report")}
    on_parent = mlflow.MlflowClient().get_run(parent.info.run_id).data.metrics
    assert on_parent["base/arithmetic/greedy_accuracy"] == pytest.approx(30 / N), "the pipeline run compares every model"
    assert {"sft-original/arithmetic/greedy_accuracy", "idft-hinted/arithmetic_ood/greedy_accuracy"} <= set(on_parent)
    assert artifacts == {"report/report.md", "report/comparison.png", "report/comparison.json"}
    experiment = mlflow.MlflowClient().get_experiment_by_name("test-report")
    store = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent
    assert experiment.artifact_location == (store / "mlruns").as_uri(), "artefacts beside the store, not in the working directory"
    view = json.loads(experiment.tags["mlflow.sharedViewState.onpolicy-comparison"])  # what the UI opens by ?viewStateShareKey=
    assert view["searchFilter"] == "tags.`onpolicy.stage` = 'eval'"
    # Ordered by date, MLflow's table folds trained models' eval runs under their collapsed parents.
    assert view["orderByKey"] != "attributes.start_time", "every model's eval run is a row of its own"
    assert {"metrics.`arithmetic/greedy_accuracy`", "metrics.`arithmetic_ood/strict_greedy_accuracy`",
            "metrics.`arithmetic/truncated_rate`"} <= set(view["selectedColumns"]), "the eval runs' own metric keys"
    saved = json.loads(Path(paths.report, "comparison.json").read_text())
    assert saved["table"]["arithmetic_ood"]["idft-hinted"]["vs_base"]["n"] == N


def test_small_samples_are_called_smoke_scale(paths, tmp_path):
    small = dataclasses.replace(paths, eval=str(tmp_path / "small"), report=str(tmp_path / "small-report"))
    global N
    saved, N = N, 16
    try:
        _fake_eval(small, "base", {"arithmetic": 2})
        _fake_eval(small, "sft-original", {"arithmetic": 5})
        _fake_eval(small, "idft-original", {"arithmetic": 6})
        run_report(REPORT, small, OFF, EVAL, ["sft-original", "idft-original"])
    finally:
        N = saved
    md = Path(small.report, "report.md").read_text()
    assert "**Smoke scale.** 16 problems per benchmark" in md
    assert "Problems: at most 16 per benchmark, a random sample (seed 0) kept in file order" in md
    assert "No method differs significantly from sft-original on arithmetic at n = 16." in md


def test_report_without_an_evaluation_names_the_missing_file(paths):
    with pytest.raises(InputError, match=r"dft-original/summary.json"):
        run_report(REPORT, paths, OFF, EVAL, ["dft-original"])


def test_plot_takes_accuracies_of_exactly_zero_and_one(tmp_path):
    """An interval end a rounding error beyond 0% or 100% once made matplotlib refuse the error bars."""
    from onpolicy_core.stages.report import plot_comparison

    def cell(k):
        e = wilson(k, 300)
        return {"estimate": {"value": e.value, "low": e.low, "high": e.high, "n": 300, "seeds": 1, "sd": None}}

    plot_comparison({"b": {"base": cell(0), "sft-original": cell(300)}}, "greedy", tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_on_data_identical_to_another_runs_is_not_a_separate_result(tmp_path):
    """All rewrites fell back: the hinted set trains on exactly the original (question, solution)
    pairs, so idft-hinted is idft-original under another name; the report flags both facts."""
    from onpolicy_core.data.io import write_jsonl
    from onpolicy_core.stages.report import data_flags, same_data, training_sets

    paths = dataclasses.replace(BASE.paths, data=str(tmp_path / "data"), realign=str(tmp_path / "realign"))
    original = [{"id": f"p{i}", "question": f"q{i}", "solution": f"s{i}", "answer": "1", "source": "t"} for i in range(4)]
    write_jsonl(tmp_path / "data" / "train.jsonl", original)
    write_jsonl(tmp_path / "realign" / "hinted" / "train.jsonl",
                [{**r, "original_solution": r["solution"], "realign_outcome": "fallback_original"} for r in original])
    write_jsonl(tmp_path / "realign" / "self_distill" / "train.jsonl",
                [{**r, "solution": "mine" if i < 3 else r["solution"], "realign_outcome": "realigned" if i < 3 else "fallback_original"}
                 for i, r in enumerate(original)])
    sets = training_sets(paths)
    assert sets["hinted"]["fallback_share"] == 1.0 and sets["self_distill"]["fallback_share"] == 0.25
    assert sets["hinted"]["digest"] == sets["original"]["digest"] != sets["self_distill"]["digest"]
    runs = ["sft-original", "idft-original", "idft-hinted", "idft-hinted-s1", "idft-self_distill"]
    aliases = same_data(runs, sets)
    assert aliases == {"idft-hinted": "idft-original"}
    flags = data_flags(sets, aliases)
    assert any(f.startswith("hinted: 100.0% of its 4 training examples are the original solution") for f in flags)
    assert any("idft-hinted trained on exactly the data of idft-original" in f for f in flags)
    assert not any(f.startswith("self_distill") for f in flags), "25% fallback is not mostly the original"
    assert sets["self_distill"]["shared_with"] == {"original": 0.25} and sets["hinted"]["shared_with"] == {"original": 1.0, "self_distill": 0.25}
    assert not any("word for word" in f for f in flags), "identical sets are merged, a 25% overlap is not flagged"
    # Rewrites that are nearly all the same text (Hinted Decoding that barely mixed) are flagged as nearly one result.
    many = [{**r, "id": f"p{i}", "question": f"q{i}", "solution": f"s{i}"} for i, r in enumerate(original * 5)]
    mine = [{**r, "solution": f"mine {i}"} for i, r in enumerate(many)]
    write_jsonl(tmp_path / "data" / "train.jsonl", many)
    write_jsonl(tmp_path / "realign" / "self_distill" / "train.jsonl", mine)
    write_jsonl(tmp_path / "realign" / "hinted" / "train.jsonl", [{**r, "solution": "x" if i == 0 else r["solution"]} for i, r in enumerate(mine)])
    flags = data_flags(training_sets(paths), {})
    assert flags == ["self_distill and hinted: 95.0% of their training examples are the same text word for word, so runs on them "
                     "differ only by the rest: read their rows as nearly one result."]


def test_a_model_that_answers_as_base_does_is_flagged_as_the_start_policy(paths):
    """A run whose learning rate barely moved it gives the base model's answers word for word: its row
    is the start policy under another name, and the report says so beside its accuracy."""
    _fake_eval(paths, "dpo-original", {"arithmetic": 30, "arithmetic_ood": 12}, answers_as="base")
    out = run_report(REPORT, paths, OFF, EVAL, ["sft-original", "dpo-original"])
    assert out["same_answers_as_base"] == {"sft-original": {"arithmetic": 0.0, "arithmetic_ood": 0.0, "all": 0.0},
                                           "dpo-original": {"arithmetic": 1.0, "arithmetic_ood": 1.0, "all": 1.0}}
    assert out["truncation_flags"][-1].startswith("dpo-original: 100.0% of its greedy answers are the base model's text word for word")
    assert not any(f.startswith("sft-original") for f in out["truncation_flags"])
    md = Path(paths.report, "report.md").read_text()
    assert "| dpo-original | 1 | 25.0 [" in md and "| 0.0% | 100.0% | +0.0" in md, "the share sits beside the accuracy"


def test_cost_per_method_counts_data_preparation_training_and_the_rate_search(paths, tmp_path):
    """The paper's third axis from the stages' run records: Hinted Decoding is the hinted runs' data
    preparation, training is the mean over seeds, and the rate search is the sum of the trials the runs'
    tune entry ran (none for a rate fixed by hand)."""
    paths = dataclasses.replace(paths, train=str(tmp_path / "train"), tune=str(tmp_path / "tune"))
    for run, (wall, cpu) in {"sft-original": (80, 150), "idft-original": (90, 170), "idft-original-s1": (110, 190),
                             "idft-hinted": (70, 130)}.items():
        write_json(tmp_path / ".runs" / "train" / f"{run}.json", {"process_seconds": wall, "cpu_seconds": cpu})
    write_json(Path(paths.realign).parent / ".runs" / "realign" / "hinted.json",
               {"process_seconds": 120, "cpu_seconds": 200, "shards": {"shard-1-of-2": {"cpu_seconds": 40}}})
    write_json(tmp_path / "tune" / "idft" / "trials.json", [{"seconds": 100.0}, {"seconds": 140.5}])
    write_json(tmp_path / "tune" / "idft-hinted" / "trials.json", [{"seconds": 95.0}])
    out = run_report(REPORT, paths, OFF, EVAL, RUNS, rate_files={"idft-hinted": str(tmp_path / "tune/idft-hinted/best.json")})
    cost = out["cost"]
    assert cost["idft-original"] == {"data_wall_s": 0.0, "data_cpu_s": 0.0, "train_wall_s": 100.0, "train_cpu_s": 180.0,
                                     "seeds": 2, "tune_wall_s": 240.5, "tune_trials": 2}
    assert cost["idft-hinted"]["data_wall_s"] == 120 and cost["idft-hinted"]["data_cpu_s"] == 240, "shards' CPU counted"
    assert cost["idft-hinted"]["tune_wall_s"] == 95.0, "the runs' own tune entry, not their method's"
    assert cost["sft-original"]["tune_wall_s"] is None, "no search ran for it"
    md = Path(paths.report, "report.md").read_text()
    assert "| idft-original | 0 | 0 | 100 | 180 | 180 | 240 (2) |" in md and "| sft-original | 0 | 0 | 80 | 150 | 150 | – |" in md


def test_a_tuned_rate_at_the_end_of_its_grid_or_no_better_than_the_start_policy_is_flagged(paths, tmp_path):
    """A grid search cannot see past its ends, and a best trial that ties the start policy means no rate
    helped: both are warnings, not footnotes. A rate inside its grid that beat the start policy, and a
    rate fixed by hand, are not flagged."""
    paths = dataclasses.replace(paths, tune=str(tmp_path / "tune"))

    def best(method, rate, value, start, source="tuned"):
        write_json(tmp_path / "tune" / method / "best.json",
                   {"method": method, "learning_rate": rate, "source": source, "metric": "greedy_accuracy",
                    "grid": [1e-6, 1e-5, 1e-4] if source == "tuned" else None, "trials": 3,
                    "objective": {"value": value, "low": 0.0, "high": 1.0, "n": 48},
                    "start_policy": {"value": start, "low": 0.0, "high": 1.0, "n": 48}})

    best("idft", 1e-6, 0.25, 0.25)
    best("sft", 1e-5, 0.40, 0.25)
    out = run_report(REPORT, paths, OFF, EVAL, ["sft-original", "idft-original"])
    rate_flags = [f for f in out["truncation_flags"] if "grid" in f]
    assert rate_flags == [
        "idft: the chosen learning rate 1e-06 is the lowest point of its grid, so the best rate may lie below it: "
        "extend the grid (tune.grid, or the method's own) and tune again.",
        "idft: no learning rate of its grid beat the start policy on validation (25.0% vs 25.0%, n = 48): within the "
        "tuning budget, training did not help, so its rows show a model that has barely left the start policy."]
    best("idft", 1e-4, 0.30, 0.25)
    best("sft", 1e-4, 0.40, 0.25, source="fixed")
    flags = run_report(REPORT, paths, OFF, EVAL, ["sft-original", "idft-original"])["truncation_flags"]
    assert [f for f in flags if f.startswith("idft:")] == [
        "idft: the chosen learning rate 0.0001 is the highest point of its grid, so the best rate may lie above it: "
        "extend the grid (tune.grid, or the method's own) and tune again."]
    assert not [f for f in flags if f.startswith("sft:")], "a rate fixed by hand is the user's choice"
    assert "⚠ idft: the chosen learning rate 0.0001" in Path(paths.report, "report.md").read_text()
