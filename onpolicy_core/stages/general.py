"""Stage `general`: how much general ability a model keeps, as multiple choice by log-likelihood
(lm-eval's method, cloze prompt; `choices.py`, `data/multiple_choice.py`) on ARC-Easy, ARC-Challenge
and MMLU-STEM.

Per set: accuracy (argmax of the summed log p of each choice) and acc_norm (argmax per character of
the choice), each with its Wilson 95% interval, and the chance rate (mean of 1 / choices). Every
question is kept in `records.parquet` with its per-choice log-probabilities, so the report pairs
models question by question. Work units (general.work_unit questions of one set) are checkpointed: a
killed run resumes. The data files are read from general.data_root and are not DVC inputs (they
may not exist on a fresh clone, where general.benchmarks is empty); their content hashes are part of
the resume fingerprint. Timing is in the run record (artifacts/.runs/general/<model>.json) and
MLflow, not in summary.json, so a rerun of the same inputs writes the same bytes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from onpolicy_core.algorithms.choices import (
    encode_question,
    predictions,
    score_questions,
)
from onpolicy_core.algorithms.statistics import wilson
from onpolicy_core.data.io import InputError, file_sha256, write_json, write_parquet
from onpolicy_core.data.multiple_choice import (
    FILES,
    Question,
    context,
    continuations,
    load_choice_set,
)
from onpolicy_core.plumbing.config import (
    BASE,
    GeneralConfig,
    ModelConfig,
    PathsConfig,
    TrackingConfig,
    to_dict,
)
from onpolicy_core.plumbing.models import resolve_precision
from onpolicy_core.plumbing.tracking import log_metrics_to
from onpolicy_core.stages.eval import model_folder, model_tags, training_run_id
from onpolicy_core.stages.skeleton import (
    map_units,
    model_stage,
    publish,
    write_run_record,
)

log = logging.getLogger(__name__)

COLUMNS = {"benchmark": "string", "id": "string", "answer": "int64", "n_choices": "int64", "pred": "int64",
           "pred_norm": "int64", "correct": "bool", "correct_norm": "bool", "logprobs": "list<double>",
           "choice_tokens": "list<int64>", "choice_chars": "list<int64>"}
"""records.parquet: one row per question (pred: by summed log p; pred_norm: by log p per character)."""


def records_schema():
    """The column types of records.parquet (an empty table needs them too)."""
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "bool": pa.bool_(), "list<double>": pa.list_(pa.float64()),
             "list<int64>": pa.list_(pa.int64())}
    return pa.schema([(name, types[t]) for name, t in COLUMNS.items()])


def score_set(model, tokenizer, benchmark: str, questions: list[Question], batch_size: int, precision: str) -> tuple[list[dict], int]:
    """One row per question (see COLUMNS) and the number of choices whose tokens were encoded alone
    (encode_question's boundary fallback)."""
    encoded = [encode_question(tokenizer, context(q), continuations(q)) for q in questions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = score_questions(model, [e[0] for e in encoded], [e[1] for e in encoded], batch_size=batch_size,
                             pad_token_id=pad, precision=precision)
    rows = []
    for q, s in zip(questions, scores):
        chars = [len(c) for c in q.choices]
        pred, pred_norm = predictions(s, chars)
        rows.append({"benchmark": benchmark, "id": q.id, "answer": q.answer, "n_choices": len(q.choices), "pred": pred,
                     "pred_norm": pred_norm, "correct": pred == q.answer, "correct_norm": pred_norm == q.answer,
                     "logprobs": [float(x) for x in s.logprobs], "choice_tokens": [int(x) for x in s.tokens],
                     "choice_chars": chars})
    return rows, sum(e[2] for e in encoded)


def set_metrics(rows: list[dict]) -> dict:
    """n, acc and acc_norm with Wilson 95% intervals, and the chance rate (mean of 1 / choices)."""
    acc, norm = wilson(sum(r["correct"] for r in rows), len(rows)), wilson(sum(r["correct_norm"] for r in rows), len(rows))
    return {"n": len(rows), "acc": acc.value, "acc_low": acc.low, "acc_high": acc.high, "acc_norm": norm.value,
            "acc_norm_low": norm.low, "acc_norm_high": norm.high,
            "chance": sum(1 / r["n_choices"] for r in rows) / len(rows) if rows else float("nan")}


def run_general(cfg: GeneralConfig, paths: PathsConfig, tracking: TrackingConfig, model_cfg: ModelConfig, name: str = BASE) -> dict:
    """Score model `name` ('base' or '<method>-<data>') on general.benchmarks; write
    <paths.general>/<name>/{records.parquet, summary.json, metrics.json} and return the metrics per set."""
    folder = model_folder(paths, name)
    out = Path(paths.general) / name
    if not cfg.benchmarks:
        # Nothing to score: empty outputs at once (no model, no data files, no MLflow run).
        write_parquet(out / "records.parquet", [], records_schema())
        write_json(out / "summary.json", {"model": name, "benchmarks": {}, "skipped": {}})
        write_json(out / "metrics.json", {})
        write_run_record(out, {"seconds": 0.0, "mlflow_run_id": None, "note": "general.benchmarks is empty"})
        log.info("general %s: general.benchmarks is empty; wrote empty outputs to %s", name, out)
        return {}
    if not (folder / "config.json").is_file():
        hint = "run `onpolicy model` and `onpolicy prime`" if name == BASE else f"run `dvc repro train@{name}` (or `onpolicy train --run {name}`)"
        raise InputError(f"{folder}: no model for {name!r}; {hint}")
    precision = resolve_precision(cfg.precision)  # settled once; part of the fingerprint
    loaded = {b: load_choice_set(b, cfg.data_root, cfg.limit, cfg.limit_order, cfg.seed) for b in cfg.benchmarks}
    settings = to_dict(cfg) | {"precision": precision}
    fingerprint = {"config": settings, "files": {b: file_sha256(Path(cfg.data_root) / FILES[b]) for b in cfg.benchmarks},
                   "questions": {b: [q.id for q in s.questions] for b, s in loaded.items()}}
    config = {"general": settings, "model": name, "model_folder": str(folder)}
    parent = training_run_id(paths, name)
    units = [(b, start) for b, s in loaded.items() for start in range(0, len(s.questions), cfg.work_unit)]
    seconds: dict[str, float] = dict.fromkeys(cfg.benchmarks, 0.0)
    scored: dict[str, int] = dict.fromkeys(cfg.benchmarks, 0)
    fallbacks = 0
    with model_stage("general", config, tracking, out=out, model_dir=folder, fingerprint=fingerprint, run_name=f"general-{name}",
                     parent_run_id=parent, inputs=[folder], dtype=model_cfg.dtype) as stage:
        stage.run.set_tags(model_tags(name) | {"onpolicy.benchmarks": ",".join(cfg.benchmarks), "onpolicy.precision": precision})
        start = time.perf_counter()

        def score_unit(unit: list[tuple[str, int]]) -> list[dict]:
            nonlocal fallbacks
            ((benchmark, first),) = unit
            questions = loaded[benchmark].questions[first : first + cfg.work_unit]
            began = time.perf_counter()
            rows, fell_back = score_set(stage.model, stage.tokenizer, benchmark, questions, cfg.batch_size, precision)
            seconds[benchmark] += time.perf_counter() - began
            scored[benchmark] += len(questions)
            fallbacks += fell_back
            log.info("general %s: %s questions %d-%d done", name, benchmark, first, first + len(questions) - 1)
            return rows

        rows = map_units(stage.shards, units, 1, score_unit)
        total = time.perf_counter() - start
        metrics = {b: set_metrics([r for r in rows if r["benchmark"] == b]) for b in cfg.benchmarks}
        skipped = {b: {"counts": dict(s.skipped), "examples": s.examples} for b, s in loaded.items() if s.skipped}
        summary = {"model": name, "precision": precision, "prompt": "cloze: 'Question: {question}\\nAnswer:' + ' {choice}'",
                   "benchmarks": metrics, "skipped": skipped}
        # Throughput of the work done now (units read back from a killed run's checkpoints cost nothing here).
        timing = {b: {"seconds": round(seconds[b], 2), "questions": scored[b],
                      "questions_per_second": round(scored[b] / seconds[b], 2) if seconds[b] else None} for b in cfg.benchmarks}
        record = {"seconds": round(total, 1), "per_set": timing, "boundary_fallbacks": fallbacks, "mlflow_run_id": stage.run.run_id,
                  "mlflow_parent_run_id": parent}
        headline = {b: {"acc": m["acc"], "acc_norm": m["acc_norm"]} for b, m in metrics.items()}
        flat = {f"{b}/{k}": v for b, m in metrics.items() for k, v in m.items()}
        if parent:
            log_metrics_to(parent, {f"general/{b}/{k}": v for b, m in headline.items() for k, v in m.items()}, tracking)
        write_parquet(out / "records.parquet", rows, records_schema())
        write_json(out / "summary.json", summary)
        publish(stage.run, out / "metrics.json", headline, [out / "summary.json", out / "records.parquet"],
                logged=flat | {f"{b}/questions_per_second": t["questions_per_second"] or 0.0 for b, t in timing.items()})
        write_run_record(out, record)
        log.info("general %s: %s -> %s", name, {b: (round(m["acc"], 3), round(m["acc_norm"], 3)) for b, m in metrics.items()}, out)
    return metrics
