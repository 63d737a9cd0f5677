"""Stage `data`: turn a source into train/eval splits in the record format, with a skip report."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from onpolicy_core.data import arithmetic
from onpolicy_core.data.io import write_json, write_jsonl
from onpolicy_core.data.sources import LoadResult, SourceError, load_source
from onpolicy_core.plumbing.config import (
    DataConfig,
    PathsConfig,
    TrackingConfig,
    to_dict,
)
from onpolicy_core.plumbing.tracking import stage_run

log = logging.getLogger(__name__)

TRAIN_FILE, EVAL_FILE, VAL_FILE, SUMMARY_FILE, METRICS_FILE = "train.jsonl", "eval.jsonl", "val.jsonl", "summary.json", "metrics.json"


def _report(name: str, result: LoadResult) -> dict:
    for reason, messages in result.examples.items():
        for message in messages:
            log.warning("skipped %s", message)
        if result.skipped[reason] > len(messages):
            log.warning("... and %d more skipped as %s", result.skipped[reason] - len(messages), reason)
    return {
        "source": name,
        "usable": len(result.problems),
        "skipped": dict(result.skipped),
        "skipped_total": sum(result.skipped.values()),
        "skip_examples": result.examples,
    }


def _load(source: str, cfg: DataConfig) -> LoadResult:
    if source == "arithmetic":
        a = cfg.arithmetic
        return LoadResult(problems=arithmetic.generate(a.n, a.min_steps, a.max_steps, a.max_operand, cfg.seed))
    return load_source(source, cfg.format, cfg.fields, cfg.max_chars, cfg.hf_config, cfg.hf_split)


def run_data(cfg: DataConfig, paths: PathsConfig, tracking: TrackingConfig) -> dict:
    """Write `train.jsonl`, `eval.jsonl`, `val.jsonl` (data.n_val problems carved from the training
    pool, possibly none) and `summary.json` under `paths.data`; return the summary."""
    out = Path(paths.data)
    files = [s for s in (cfg.source, cfg.eval_source) if s and Path(s).is_file()]
    with stage_run("data", {"data": to_dict(cfg), "paths": to_dict(paths)}, tracking, inputs=files) as run:
        loaded = _load(cfg.source, cfg)
        sources = [_report(cfg.source, loaded)]
        problems = list(loaded.problems)
        random.Random(cfg.seed).shuffle(problems)
        if cfg.eval_source:
            held_out = _load(cfg.eval_source, cfg)
            sources.append(_report(cfg.eval_source, held_out))
            eval_split, train_split = held_out.problems[: cfg.n_eval or None], problems
        else:
            if cfg.n_eval >= len(problems):
                raise SourceError(f"{cfg.source}: n_eval={cfg.n_eval} leaves no training data ({len(problems)} usable)")
            eval_split, train_split = problems[: cfg.n_eval], problems[cfg.n_eval :]
        if cfg.n_val and cfg.n_val >= len(train_split):
            raise SourceError(f"{cfg.source}: n_val={cfg.n_val} leaves no training data ({len(train_split)} after the eval split)")
        val_split, train_split = train_split[: cfg.n_val], train_split[cfg.n_val :]
        if cfg.n_train is not None:
            train_split = train_split[: cfg.n_train]
        write_jsonl(out / TRAIN_FILE, (p.to_dict() for p in train_split))
        write_jsonl(out / EVAL_FILE, (p.to_dict() for p in eval_split))
        write_jsonl(out / VAL_FILE, (p.to_dict() for p in val_split))
        summary = {"train": len(train_split), "eval": len(eval_split), "val": len(val_split), "sources": sources}
        write_json(out / SUMMARY_FILE, summary)
        write_json(out / METRICS_FILE, {k: summary[k] for k in ("train", "eval", "val")} | {"skipped": sum(s["skipped_total"] for s in sources)})
        skipped = sum(s["skipped_total"] for s in sources)
        run.log_metrics({"train_examples": len(train_split), "eval_examples": len(eval_split), "val_examples": len(val_split),
                         "skipped": skipped})
        run.log_artifact(out / SUMMARY_FILE)
        log.info("data: %d train, %d eval, %d skipped -> %s", len(train_split), len(eval_split), skipped, out)
    return summary
