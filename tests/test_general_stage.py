"""The general-ability stage (multiple choice by log-likelihood): the loader's skips and errors, the
config, the stage on the embedded model with real ARC-Easy questions (files, metrics, MLflow, resume
after a kill), the empty default, and the report's section."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from onpolicy_core.data.io import write_parquet
from onpolicy_core.data.multiple_choice import load_choice_set
from onpolicy_core.data.sources import SourceError
from onpolicy_core.plumbing.config import ConfigError
from onpolicy_core.stages import general as general_stage
from onpolicy_core.stages.skeleton import partial_dir, run_record_path
from tests.conftest import SHARED_DATA, KilledOnCall, default_config

BASE = default_config()
OFF = dataclasses.replace(BASE.tracking, enabled=False)


def _arc(tmp_path, rows):
    (tmp_path / "arc_easy").mkdir(parents=True, exist_ok=True)
    (tmp_path / "arc_easy" / "test.jsonl").write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_bad_rows_are_counted_skips_naming_file_and_line(tmp_path):
    good = {"id": "q1", "question": "Which is a gas?", "choices": ["ice", "steam", "rock"], "answer": 1}
    rows = [good, {"question": "No choices", "answer": 0}, {**good, "id": "q3", "answer": 3}, {**good, "id": "q4", "choices": ["one"],
            "answer": 0}, "{not json\n", {**good, "id": "q6", "answer": "1"}, {"question": "mmlu style", "choices": ["a", "b"], "answer": 0}]
    loaded = load_choice_set("arc_easy", _arc(tmp_path, rows), None, "first", 0)
    assert [q.id for q in loaded.questions] == ["q1", "arc_easy-7"], "a row without id is named by its line"
    assert dict(loaded.skipped) == {"missing_choices": 1, "answer_out_of_range": 1, "fewer_than_two_choices": 1, "invalid_json": 1,
                                    "missing_answer": 1}
    assert loaded.examples["answer_out_of_range"] == [f"{tmp_path / 'arc_easy' / 'test.jsonl'}:3: answer_out_of_range"]


def test_a_missing_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(SourceError, match=r"arc_challenge/test.jsonl: file of general-ability set 'arc_challenge' not found") as info:
        load_choice_set("arc_challenge", tmp_path, None, "first", 0)
    assert "\n" not in str(info.value)


def test_the_cli_prints_one_line_for_a_missing_file(tmp_path):
    from typer.testing import CliRunner

    from onpolicy_core.cli import app

    result = CliRunner().invoke(app, ["general", "--set", "general.benchmarks=[mmlu_stem]", "--set", f"general.data_root={tmp_path}",
                                      "--set", f"paths.model={tmp_path}", "--set", f"paths.policy={tmp_path}", "--set", "tracking.enabled=false"])
    assert result.exit_code == 2
    # the model folder is checked first: either error is one line naming the path
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and str(tmp_path) in result.output


def test_config_rejects_an_unknown_set_naming_the_key():
    with pytest.raises(ConfigError, match=r"general\.benchmarks\[1\]: must be one of \['arc_easy', 'arc_challenge', 'mmlu_stem'\]"):
        default_config("general.benchmarks=[arc_easy, hellaswag]")
    with pytest.raises(ConfigError, match="general.batch_size"):
        default_config("general.batch_size=0")
    with pytest.raises(ConfigError, match="twice"):
        default_config("general.benchmarks=[arc_easy, arc_easy]")
    assert BASE.general.benchmarks == [], "the default runs on a fresh clone without ../shared/data"


def test_empty_benchmarks_write_empty_outputs_without_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(general_stage, "model_stage", None)  # would fail if the stage tried to open the model
    paths = dataclasses.replace(BASE.paths, model=str(tmp_path / "no-model"), policy=str(tmp_path / "no-model"), general=str(tmp_path / "general"))
    assert general_stage.run_general(BASE.general, paths, OFF, BASE.model) == {}
    out = tmp_path / "general" / "base"
    assert len(pd.read_parquet(out / "records.parquet")) == 0
    assert json.loads((out / "metrics.json").read_text()) == {}
    assert json.loads((out / "summary.json").read_text())["benchmarks"] == {}


@pytest.fixture
def arc_easy():
    if not (SHARED_DATA / "arc_easy" / "test.jsonl").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def _setup(tmp_path, model_dir, data_root, **kw):
    paths = dataclasses.replace(BASE.paths, model=str(model_dir), policy=str(model_dir), general=str(tmp_path / "general"), train=str(tmp_path / "train"))
    cfg = dataclasses.replace(BASE.general, **({"benchmarks": ["arc_easy"], "data_root": str(data_root), "limit": 24,
                                                "limit_order": "first", "batch_size": 8, "work_unit": 8, "precision": "fp32"} | kw))
    return paths, cfg


def test_general_stage_on_real_arc_easy(tmp_path, embedded_model_dir, arc_easy):
    import mlflow

    from onpolicy_core.algorithms.choices import reference_logprob
    from onpolicy_core.data.multiple_choice import context, continuations
    from onpolicy_core.plumbing.models import load_materialised

    paths, cfg = _setup(tmp_path, embedded_model_dir, arc_easy)
    tracking = dataclasses.replace(BASE.tracking, enabled=True, experiment="test-general")
    metrics = general_stage.run_general(cfg, paths, tracking, BASE.model)
    out = tmp_path / "general" / "base"
    records = pd.read_parquet(out / "records.parquet")
    assert len(records) == 24 and list(records.columns) == list(general_stage.COLUMNS)
    assert (records["logprobs"].map(len) == records["n_choices"]).all() and (records["logprobs"].map(max) < 0).all()
    m = metrics["arc_easy"]
    assert m["n"] == 24 and 0 <= m["acc"] <= 1 and 0 <= m["acc_norm"] <= 1 and m["acc_low"] <= m["acc"] <= m["acc_high"]
    assert m["chance"] == pytest.approx((1 / records["n_choices"]).mean())
    assert json.loads((out / "metrics.json").read_text()) == {"arc_easy": {"acc": m["acc"], "acc_norm": m["acc_norm"]}}
    assert json.loads((out / "summary.json").read_text())["benchmarks"]["arc_easy"] == m
    assert json.loads(run_record_path(out).read_text())["per_set"]["arc_easy"]["questions"] == 24
    # The cached batched scores of the real model and tokenizer are the naive per-choice forward's.
    model, tokenizer = load_materialised(embedded_model_dir, dtype="float32")
    questions = load_choice_set("arc_easy", arc_easy, 2, "first", 0).questions
    for q, row in zip(questions, records.itertuples()):
        ctx = tokenizer(context(q), add_special_tokens=False)["input_ids"]
        for cont, lp in zip(continuations(q), row.logprobs):
            whole = tokenizer(context(q) + cont, add_special_tokens=False)["input_ids"]
            assert whole[: len(ctx)] == ctx
            assert reference_logprob(model, ctx, whole[len(ctx):]) == pytest.approx(lp, abs=1e-3)
    run = mlflow.search_runs(experiment_names=["test-general"], filter_string="tags.`onpolicy.stage` = 'general'").iloc[0]
    assert run["metrics.arc_easy/acc"] == pytest.approx(m["acc"]) and run["tags.onpolicy.model"] == "base"


def test_killed_general_run_resumes_to_the_same_bytes(tmp_path, embedded_model_dir, arc_easy, monkeypatch):
    paths, cfg = _setup(tmp_path, embedded_model_dir, arc_easy)
    real = general_stage.score_set
    killed = KilledOnCall(real, kill_at=2)
    monkeypatch.setattr(general_stage, "score_set", killed)
    out = tmp_path / "general" / "base"
    with pytest.raises(KeyboardInterrupt):
        general_stage.run_general(cfg, paths, OFF, BASE.model)
    assert not (out / "records.parquet").exists(), "no half-written output"
    assert len(list(partial_dir(out).glob("unit-*.jsonl"))) == 1
    killed.reset()
    general_stage.run_general(cfg, paths, OFF, BASE.model)
    assert killed.calls == 2, "the finished unit is read back, the other two computed"
    resumed = {f: (out / f).read_bytes() for f in ("records.parquet", "summary.json", "metrics.json")}
    monkeypatch.setattr(general_stage, "score_set", real)
    general_stage.run_general(cfg, paths, OFF, BASE.model)
    assert resumed == {f: (out / f).read_bytes() for f in resumed}
    assert not partial_dir(out).exists()


def _fake_general(root, model, correct, correct_norm):
    rows = [{"benchmark": "arc_easy", "id": f"q{i}", "answer": 0, "n_choices": 4, "pred": 0 if c else 1, "pred_norm": 0 if cn else 1,
             "correct": c, "correct_norm": cn, "logprobs": [-1.0] * 4, "choice_tokens": [1] * 4, "choice_chars": [3] * 4}
            for i, (c, cn) in enumerate(zip(correct, correct_norm))]
    write_parquet(root / model / "records.parquet", rows, general_stage.records_schema())


def test_report_section_pairs_models_with_mcnemar_and_holm(tmp_path):
    from onpolicy_core.stages.report import general_table, render_general

    paths = dataclasses.replace(BASE.paths, general=str(tmp_path))
    n = 60
    _fake_general(tmp_path, "base", [i % 2 == 0 for i in range(n)], [i % 2 == 0 for i in range(n)])
    _fake_general(tmp_path, "sft-original", [i % 2 == 0 for i in range(n)], [i % 2 == 0 or i < 2 for i in range(n)])
    _fake_general(tmp_path, "idft-original", [i < 5 for i in range(n)], [True] * n)
    cfg = dataclasses.replace(BASE.general, benchmarks=["arc_easy"], limit=500)
    table = general_table(paths, cfg, ["base", "sft-original", "idft-original"])
    cells = table["arc_easy"]
    assert cells["base"]["acc"]["value"] == 0.5 and cells["base"]["chance"] == 0.25 and "vs_base" not in cells["base"]
    assert cells["sft-original"]["vs_base"]["acc"]["p_value"] == 1.0
    assert cells["idft-original"]["vs_base"]["acc"]["diff"] < 0 and cells["idft-original"]["vs_base"]["acc"]["p_holm"] < 0.05
    text = render_general(table, cfg)
    assert text.startswith("## General ability (multiple choice, log-likelihood)")
    assert "no significant difference" in text and "significantly lower" in text and "significantly higher" in text
    assert render_general({}, cfg) == ""
