"""Stage `score`: DDT-score a corpus under the model (per token, per example, and in summary)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from onpolicy_core.algorithms import ddt
from onpolicy_core.algorithms.prompts import encode_pair, render_prompt
from onpolicy_core.data.io import (
    InputError,
    ShardedResults,
    atomic_path,
    file_sha256,
    iter_jsonl,
    write_json,
    write_jsonl,
    write_parquet,
)
from onpolicy_core.plumbing.config import (
    PathsConfig,
    ScoreConfig,
    TrackingConfig,
    output_settings,
    to_dict,
)
from onpolicy_core.plumbing.models import resolve_precision
from onpolicy_core.stages.skeleton import (
    Shard,
    map_units,
    model_stage,
    n_units,
    publish,
    run_units,
    write_run_record,
)

log = logging.getLogger(__name__)

SCORES_FILE, SUMMARY_FILE, METRICS_FILE = "scores.parquet", "summary.json", "metrics.json"
PLOT_FILE, SELECTED_FILE = "phi.png", "selected.jsonl"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _read_scorable(path: Path, response_field: str) -> list[dict]:
    """Records with string `id`, `question` and `response_field`; anything else is an error naming the line."""
    rows = []
    for lineno, row in iter_jsonl(path):
        if isinstance(row, InputError):
            raise row
        bad = [k for k in ("id", "question", response_field) if not isinstance(row.get(k), str)]
        if bad:
            raise InputError(f"{path}:{lineno}: record lacks string field(s) {bad}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no records to score")
    return rows


def score_records(model, tokenizer, problems: list[dict], cfg: ScoreConfig, response_field: str = "solution",
                  shards: ShardedResults | None = None, units: range | None = None) -> list[dict]:
    """Per-example rows (stats and per-token arrays) in input order; work units (cfg.work_unit records)
    make it resumable, and `units` limits it to a shard's units.

    Each record needs `id`, `question` and `response_field`; the prompt is the shared chat prompt.
    """
    todo = len(problems) if units is None else sum(len(problems[u * cfg.work_unit : (u + 1) * cfg.work_unit]) for u in units)
    bar = tqdm(total=todo, desc="DDT scoring", unit="ex", dynamic_ncols=True)
    tokens_done, start = 0, time.perf_counter()

    def progress(n_examples: int, n_tokens: int) -> None:
        nonlocal tokens_done
        tokens_done += n_tokens
        bar.update(n_examples)
        bar.set_postfix(tok_s=f"{tokens_done / max(time.perf_counter() - start, 1e-9):.0f}")

    def score_shard(chunk: list[dict]) -> list[dict]:
        pairs = [encode_pair(tokenizer, render_prompt(tokenizer, p["question"]), p[response_field]) for p in chunk]
        scores = ddt.score_pairs(model, pairs, cfg.temperature, cfg.chunk_size, cfg.max_tokens_per_batch,
                                 cfg.max_batch_size, tokenizer.pad_token_id or 0, on_batch=progress,
                                 layout=cfg.layout, precision=cfg.precision)
        return [
            {
                "id": p["id"],
                **ddt.example_stats(s, cfg.thresholds),
                "phi": [round(float(v), 5) for v in s.phi],
                "logp": [round(float(v), 5) for v in s.logp],
                "entropy": [round(float(v), 5) for v in s.entropy],
                "tokens": tokenizer.convert_ids_to_tokens(response),
            }
            for p, s, (_, response) in zip(chunk, scores, pairs)
        ]

    rows = map_units(shards, problems, cfg.work_unit, score_shard, on_resumed=bar.update, units=units)
    bar.close()
    return rows


def _histogram(values: np.ndarray, bins: int, lo: float | None = None, hi: float | None = None) -> dict:
    if values.size == 0:
        return {"edges": [], "counts": []}
    lo = float(values.min()) if lo is None else lo
    hi = float(values.max()) if hi is None else hi
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi if hi > lo else lo + 1e-6))
    return {"edges": [round(float(e), 5) for e in edges], "counts": [int(c) for c in counts]}


def summarise(rows: list[dict], cfg: ScoreConfig) -> dict:
    """Corpus-level statistics: the distribution of avg-phi over examples and of phi over tokens."""
    scored = [r for r in rows if r["n_tokens"]]
    avg = np.array([r["avg_phi"] for r in scored], dtype=np.float64)
    tok = np.concatenate([np.asarray(r["phi"], dtype=np.float64) for r in scored]) if scored else np.zeros(0)
    summary: dict = {
        "examples": len(rows),
        "scored_examples": len(scored),
        "empty_responses": len(rows) - len(scored),
        "tokens": int(tok.size),
        "temperature": cfg.temperature,
    }
    if scored:
        summary["avg_phi"] = {
            "mean": float(avg.mean()),
            "std": float(avg.std()),
            "min": float(avg.min()),
            "max": float(avg.max()),
            **{f"q{int(q * 100):02d}": float(np.quantile(avg, q)) for q in QUANTILES},
        }
        summary["token_phi"] = {
            "mean": float(tok.mean()),
            "frac_pos": float((tok > 0).mean()),
            **{ddt.threshold_key(t): float((tok > t).mean()) for t in cfg.thresholds},
        }
        summary["histograms"] = {
            "avg_phi": _histogram(avg, cfg.histogram_bins),
            "token_phi": _histogram(tok, cfg.histogram_bins, lo=max(-15.0, float(tok.min())), hi=float(tok.max())),
        }
    return summary


def select(rows: list[dict], cfg: ScoreConfig) -> tuple[list[str], dict]:
    """Ids that pass the avg-phi threshold and/or top-k (DDT as data selection), and what was done."""
    candidates = [r for r in rows if r["avg_phi"] is not None]
    rule: dict = {"threshold": cfg.select_threshold, "top_k": cfg.select_top_k, "input": len(rows)}
    if cfg.select_threshold is not None:
        candidates = [r for r in candidates if r["avg_phi"] >= cfg.select_threshold]
    if cfg.select_top_k is not None:
        candidates = sorted(candidates, key=lambda r: -r["avg_phi"])[: cfg.select_top_k]
    if cfg.select_threshold is None and cfg.select_top_k is None:
        candidates = list(rows)  # no selection configured: everything passes, empty responses included
    kept = {r["id"] for r in candidates}
    ids = [r["id"] for r in rows if r["id"] in kept]
    rule["selected"] = len(ids)
    return ids, rule


def plot(rows: list[dict], summary: dict, path: Path, title: str) -> None:
    """Two panels: per-token phi histogram and per-example avg-phi distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    tok = np.concatenate([np.asarray(r["phi"]) for r in rows if r["n_tokens"]] or [np.zeros(0)])
    left.hist(np.clip(tok, -15, None), bins=60, color="#4472c4")
    left.axvline(0, color="k", lw=0.8)
    left.set(title="per-token phi (clipped at -15)", xlabel="phi = log p + H", ylabel="tokens", yscale="log")
    avg = [r["avg_phi"] for r in rows if r["avg_phi"] is not None]
    right.hist(avg, bins=40, color="#ed7d31")
    right.axvline(0, color="k", lw=0.8)
    if "avg_phi" in summary:
        right.axvline(summary["avg_phi"]["mean"], color="r", ls="--", label=f"mean {summary['avg_phi']['mean']:.3f}")
        right.legend()
    right.set(title="per-example avg-phi", xlabel="avg phi", ylabel="examples")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def run_score(
    cfg: ScoreConfig,
    paths: PathsConfig,
    tracking: TrackingConfig,
    input_path: str | Path,
    output_dir: str | Path,
    response_field: str = "solution",
    shard: Shard | None = None,
    merge: bool = False,
) -> dict | None:
    """Score `response_field` of every record in `input_path`; write scores, summary, plot, selection.
    `shard`: score only that shard's units (no outputs; returns None); `merge`: write the outputs from
    every shard's units."""
    input_path, out = Path(input_path), Path(output_dir)
    problems = _read_scorable(input_path, response_field)
    name = out.name
    config = {"score": to_dict(cfg), "input": str(input_path), "output": str(out), "response_field": response_field}
    # "auto" is settled here, once, and is part of the fingerprint: a resume on other hardware starts over.
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision))
    fingerprint = {"score": output_settings(cfg), "input_sha256": file_sha256(input_path), "response_field": response_field}
    with model_stage("score", config, tracking, out=out, model_dir=paths.policy, fingerprint=fingerprint,
                     inputs=[paths.policy, input_path], run_name=f"score-{name}", shard=shard, merge=merge,
                     # float32 weights whatever model.dtype is: score.precision sets the matmuls (bf16
                     # autocast or fp32), and log p and H are taken in float32 either way.
                     dtype="float32") as stage:
        done = run_units(stage, out, n_units(len(problems), cfg.work_unit),
                         lambda units: score_records(stage.model, stage.tokenizer, problems, cfg, response_field, stage.shards, units),
                         shard=shard, merge=merge)
        if done is None:
            return None
        rows, timing = done.rows, done.timing()
        summary = summarise(rows, cfg)
        ids, rule = select(rows, cfg)
        summary["selection"] = rule
        summary["precision"] = cfg.precision
        out.mkdir(parents=True, exist_ok=True)
        write_parquet(out / SCORES_FILE, rows)
        keep = set(ids)
        write_jsonl(out / SELECTED_FILE, (r for r in problems if r["id"] in keep))
        write_json(out / SUMMARY_FILE, summary)
        plot(rows, summary, out / PLOT_FILE, f"DDT scores: {name} ({summary['scored_examples']} examples)")
        publish(stage.run, out / METRICS_FILE, _headline(summary), [out / SUMMARY_FILE, out / PLOT_FILE],
                logged=_flat_metrics(summary) | timing)
        write_run_record(out, done.record(stage.run))
        log.info("score %s: avg-phi mean %s over %d examples, %s tok/s", name,
                 summary.get("avg_phi", {}).get("mean"), summary["scored_examples"], timing.get("tokens_per_second"))
    return summary


def _headline(summary: dict) -> dict[str, float]:
    """The DVC metrics file: examples and the mean avg-phi (everything else: summary.json, MLflow)."""
    return {"examples": summary["scored_examples"], "avg_phi": summary.get("avg_phi", {}).get("mean")}


def _flat_metrics(summary: dict) -> dict[str, float]:
    flat = {k: summary[k] for k in ("examples", "scored_examples", "empty_responses", "tokens")}
    for group in ("avg_phi", "token_phi"):
        for k, v in summary.get(group, {}).items():
            flat[f"{group}.{k}"] = v
    flat["selected"] = summary["selection"]["selected"]
    return {k: (v if v is None or not isinstance(v, float) or math.isfinite(v) else None) for k, v in flat.items()}
