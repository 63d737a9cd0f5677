"""Write the measured table of docs/performance.md from the benches' results (docs/results/perf/*.json).

    .venv/bin/python bench/performance_table.py      # after the four benches; rewrites the table in place

Only the block between the `<!-- perf-table -->` markers changes; every figure comes from a JSON file
a bench wrote, with the command that wrote it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "perf"
DOC = ROOT / "docs" / "performance.md"
START, END = "<!-- perf-table -->", "<!-- /perf-table -->"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _ddt_rows(d: dict) -> list[str]:
    rows = []
    for length, label in (("short", "~120-token answers"), ("long", "~1,000-token answers")):
        runs = [r for r in d["results"] if r["length"] == length]
        if not runs:
            continue
        official = runs[0]
        for r in runs[1:]:
            rows.append(f"| DDT scoring, {label}, batch {r['batch']}, {r['layout']}, {r['precision']} "
                        f"| official {official['tok_s']} tok/s, +{official['above_model_mb']} MB "
                        f"| {r['tok_s']} tok/s ({r['compute_bound_fraction']:.0%} of the fp32 bound), +{r['above_model_mb']} MB "
                        f"| **{r['vs_official']}x**; phi vs official: max {r['max_abs_phi_diff']:.1e}, mean {r.get('mean_abs_phi_diff', float('nan')):.1e} per token, "
                        f"max {r.get('max_abs_avg_phi_diff', float('nan')):.1e} per example avg-phi |")
    return rows


def _hinted_rows(d: dict) -> list[str]:
    rows, by = [], {(r["method"], r["batch"]): r for r in d["results"]}
    official, kv = by.get(("official", 1)), by.get(("kv-cache", 1))
    base = f"official demo {official['tok_s']} tok/s" if official else "-"
    if kv:
        base += f"; cache-fixed loop {kv['tok_s']} tok/s, {kv['peak_mb']} MB"
    for r in d["results"]:
        if r["method"] not in ("project", "vllm"):
            continue
        ratios = [f"**{r['vs_official']}x demo**" if "vs_official" in r else "",
                  f"{r['vs_kv_cache']}x cache-fixed" if "vs_kv_cache" in r else "",
                  f"memory {r['memory_vs_kv_cache']}x" if "memory_vs_kv_cache" in r else "",
                  "same tokens" if r.get("same_tokens_as_official") else ("tokens differ" if "same_tokens_as_official" in r else "")]
        rows.append(f"| Hinted Decoding, {d['new_tokens']} tokens, {r['method']} batch {r['batch']} | {base} "
                    f"| {r['tok_s']} tok/s, {r['tok_per_cpu_s']} tok/CPU-s, {r['peak_mb']} MB | {', '.join(x for x in ratios if x)} |")
    return rows


def _generation_rows(d: dict) -> list[str]:
    res, rows = d["results"], []
    hf = res["hf"]
    for m in ("vllm", "vllm-auto", "one-by-one"):
        if m in res:
            r = res[m]
            rows.append(f"| Generation, {r['n']} prompts x {d['new_tokens']} tokens, {m} | HF generate (batched) {hf['tok_s']} tok/s "
                        f"| {r['tok_s']} tok/s | **{r['vs_hf']}x**, greedy tokens identical {r['same_tokens_as_hf']} |")
    return rows


def _train_rows(d: dict) -> list[str]:
    res, rows = d["results"], []
    naive = res.get("idft-naive")
    for m, r in res.items():
        if m == "idft-naive":
            continue
        base = f"naive full-logit IDFT {naive['s_per_step']:.2f} s/step" if naive else "-"
        rows.append(f"| Training step, batch {d['batch']}, {m} | {base} | {r['s_per_step']:.2f} s/step, {r['peak_mb']:.0f} MB "
                    f"| {r['time_vs_sft_full']}x the time of sft:full |")
    return rows


def table() -> str:
    parts, facts, commands = [], None, []
    for name, rows in (("ddt_scoring", _ddt_rows), ("hinted_decoding", _hinted_rows), ("generation", _generation_rows),
                       ("train_losses", _train_rows)):
        d = _load(name)
        if d is None:
            continue
        facts = facts or d["machine"]
        commands.append(f"`{d['command'].strip()}`")
        parts += rows(d)
    if not parts:
        raise SystemExit(f"error: no bench results in {RESULTS}; run the benches first")
    head = (f"Machine: {facts['cpu']}, {facts['cores']} cores, torch {facts['torch']} with {facts['torch_threads']} threads; "
            f"measured matmul (2048^2) fp32 {facts['matmul_fp32_gflops']} GFLOP/s, bf16 {facts['matmul_bf16_gflops']} GFLOP/s.\n"
            f"Commands: {', '.join(commands)}.\n\n"
            "| measure | straightforward / official | project | ratio |\n|---|---|---|---|\n")
    return head + "\n".join(parts) + "\n"


def main() -> None:
    text = DOC.read_text()
    block = f"{START}\n{table()}{END}"
    new, n = re.subn(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL)
    if n != 1:
        raise SystemExit(f"error: {DOC} needs exactly one {START} ... {END} block")
    DOC.write_text(new)
    print(f"table -> {DOC}")


if __name__ == "__main__":
    main()
