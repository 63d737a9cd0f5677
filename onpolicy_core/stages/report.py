"""Stage `report`: one comparison of every evaluated model of the pipeline ("did it help?").

Reads <paths.eval>/<model>/metrics.json for the base model and each training run, and the DDT
summary of each training set (<paths.score>/<data>/summary.json). Writes report.md (benchmark x
model table with deltas against base and against SFT, plus every metric and the DDT statistics of
each training set), comparison.png (grouped bars) and comparison.json, and logs them as artefacts of
the pipeline's parent MLflow run (and of its own stage run).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from onpolicy_core.config import (
    EvalConfig,
    PathsConfig,
    ReportConfig,
    TrackingConfig,
    parse_run,
    to_dict,
)
from onpolicy_core.io import InputError, atomic_path, write_json, write_text
from onpolicy_core.stages.eval import BASE
from onpolicy_core.tracking import log_artifacts_to, stage_run

log = logging.getLogger(__name__)


def metric_key(cfg: ReportConfig, samples: int) -> str:
    """The metrics.json key of the headline metric."""
    return {"greedy": "greedy_accuracy", "avg@k": "avg_at_k", "pass@k": f"pass_at_{samples}"}[cfg.metric]


def comparison(results: dict[str, dict[str, dict]], key: str, sft_reference: str) -> dict[str, dict[str, dict]]:
    """Per model and benchmark: the headline value and its deltas against base and the SFT reference
    (None where that model was not evaluated or lacks the metric)."""
    def value(model: str, bench: str):
        return results.get(model, {}).get(bench, {}).get(key)

    table: dict[str, dict[str, dict]] = {}
    for model, per_bench in results.items():
        table[model] = {}
        for bench in per_bench:
            v, base, sft = value(model, bench), value(BASE, bench), value(sft_reference, bench)
            table[model][bench] = {
                "value": v,
                "vs_base": None if v is None or base is None or model == BASE else v - base,
                "vs_sft": None if v is None or sft is None or model in (BASE, sft_reference) else v - sft,
            }
    return table


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _data_of(model: str) -> str | None:
    return None if model == BASE else parse_run(model)[1]


def render_markdown(table: dict, results: dict, ddt: dict[str, dict], metric: str, sft_reference: str) -> str:
    benches = list(next(iter(results.values())).keys())
    lines = [f"# Comparison: {metric} (%)", "",
             f"Each cell: value (Δ vs base / Δ vs {sft_reference}), in percentage points. "
             "Training-set avg φ is the mean DDT score of the data the model was trained on (closer to 0 = more on-policy).", "",
             "| model | train-set avg φ | " + " | ".join(benches) + " |",
             "|---|---|" + "---|" * len(benches)]
    for model, cells in table.items():
        data = _data_of(model)
        phi = ddt.get(data, {}).get("avg_phi_mean") if data else None
        row = [model, "–" if phi is None else f"{phi:.3f}"]
        for b in benches:
            c = cells[b]
            row.append(f"{_pct(c['value'])} ({_pct(c['vs_base'], True)} / {_pct(c['vs_sft'], True)})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Every metric", ""]
    for b in benches:
        keys = sorted({k for m in results.values() for k in m.get(b, {})})
        lines += [f"### {b}", "", "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for model, per_bench in results.items():
            m = per_bench.get(b, {})
            lines.append("| " + model + " | " + " | ".join("–" if m.get(k) is None else f"{m[k]:.4g}" for k in keys) + " |")
        lines.append("")
    if ddt:
        lines += ["## DDT statistics of the training sets", "",
                  "| data | examples | avg φ mean | avg φ std | share of tokens φ > -1 | share φ > 0 |", "|---|---|---|---|---|---|"]
        for data, s in ddt.items():
            lines.append(f"| {data} | {s['examples']} | {s['avg_phi_mean']:.3f} | {s['avg_phi_std']:.3f} | "
                         f"{_pct(s.get('frac_phi_gt_-1'))}% | {_pct(s.get('frac_pos'))}% |")
    return "\n".join(lines) + "\n"


def plot_comparison(table: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(table)
    benches = list(next(iter(table.values())).keys())
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(benches) * max(1, len(models) / 3)), 4))
    x = np.arange(len(benches))
    for i, model in enumerate(models):
        values = [100 * (table[model][b]["value"] or 0.0) for b in benches]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=model)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, benches)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} by benchmark and model")
    ax.legend(fontsize=8, ncol=min(len(models), 3))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def ddt_statistics(paths: PathsConfig, datas: list[str]) -> dict[str, dict]:
    out = {}
    for data in datas:
        summary = Path(paths.score) / data / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            out[data] = {"examples": s["examples"], "avg_phi_mean": s["avg_phi"]["mean"], "avg_phi_std": s["avg_phi"]["std"],
                         **{k: v for k, v in s["token_phi"].items() if k.startswith("frac")}}
        else:
            log.warning("no DDT summary for training set %r at %s; the report omits it", data, summary)
    return out


def run_report(cfg: ReportConfig, paths: PathsConfig, tracking: TrackingConfig, eval_cfg: EvalConfig, runs: list[str]) -> dict:
    """Gather the evaluation of base + `runs` into <paths.report>/{report.md, comparison.png, comparison.json}."""
    models = [BASE, *runs]
    missing = [str(Path(paths.eval) / m / "metrics.json") for m in models if not (Path(paths.eval) / m / "metrics.json").exists()]
    if missing:
        raise InputError(f"no evaluation for {missing}; run `dvc repro` (or `onpolicy eval --model <name>`) first")
    results = {m: json.loads((Path(paths.eval) / m / "metrics.json").read_text()) for m in models}
    key = metric_key(cfg, eval_cfg.samples)
    table = comparison(results, key, cfg.sft_reference)
    datas = list(dict.fromkeys(d for d in map(_data_of, runs) if d))
    ddt = ddt_statistics(paths, datas)
    out = Path(paths.report)
    config = {"report": to_dict(cfg), "models": models, "metric_key": key}
    inputs = [Path(paths.eval) / m / "metrics.json" for m in models] + [Path(paths.score) / d / "summary.json" for d in datas]
    with stage_run("report", config, tracking, inputs=inputs) as run:
        write_text(out / "report.md", render_markdown(table, results, ddt, cfg.metric, cfg.sft_reference))
        plot_comparison(table, cfg.metric, out / "comparison.png")
        comparison_json = {"metric": cfg.metric, "metric_key": key, "table": table, "results": results, "ddt": ddt}
        write_json(out / "comparison.json", comparison_json)
        files = [out / "report.md", out / "comparison.png", out / "comparison.json"]
        for f in files:
            run.log_artifact(f)
        run.log_metrics({f"{m}/{b}/{key}": c["value"] for m, cells in table.items() for b, c in cells.items() if c["value"] is not None})
        if parent := os.environ.get("ONPOLICY_PARENT_RUN_ID"):
            log_artifacts_to(parent, files, tracking, artifact_path="report")
    log.info("report: %d models x %d benchmarks -> %s", len(models), len(eval_cfg.benchmarks), out / "report.md")
    return comparison_json
