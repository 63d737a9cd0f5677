"""Benchmark: DDT scoring of real GSM8K train pairs with the embedded model, two ways in one run.

  official  one example at a time, full logits and a full-vocabulary softmax at every position
            (the official `PhiCalculator` control flow; `onpolicy_core.ddt.reference_scores`)
  project   `onpolicy_core.ddt.score_batch`: length-sorted batches, LM head only over response
            positions, vocabulary work in chunks of positions

Each method runs in its own process so its peak RSS is its own. Prints scored tokens/s, peak RSS
(and peak above the loaded model) per method, and the ratios against `official`.

    .venv/bin/python bench/ddt_scoring.py --n 64 --batch-sizes 1,4,16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GSM8K_TRAIN = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gsm8k(path: Path) -> list:
    """The GSM8K problems of `path`, read as the gsm8k benchmark of the registry reads them."""
    from onpolicy_core.data.registry import BENCHMARKS
    from onpolicy_core.data.sources import load_source

    return load_source(str(path), "gsm8k", BENCHMARKS["gsm8k"].fields, max_chars=10**6).problems


def model_dir() -> Path:
    materialised = ROOT / "artifacts" / "model"
    if (materialised / "config.json").exists():
        return materialised
    from onpolicy_core.config import default_params
    from onpolicy_core.stages.model import run_model

    out = Path(tempfile.mkdtemp()) / "model"
    p = default_params([f"paths.model={out}", "tracking.enabled=false"])
    run_model(p.model, p.paths, p.tracking)
    return out


def pairs(n: int, tokenizer) -> list[tuple[list[int], list[int]]]:
    from onpolicy_core.prompts import encode_pair, render_prompt

    problems = gsm8k(GSM8K_TRAIN)[:n]
    return [encode_pair(tokenizer, render_prompt(tokenizer, p.question), p.solution) for p in problems]


def worker(method: str, n: int, batch_size: int, folder: str) -> dict:
    import torch

    from onpolicy_core import ddt
    from onpolicy_core.models import load_materialised

    torch.manual_seed(0)
    model, tok = load_materialised(folder)
    data = pairs(n, tok)
    # Warm-up on one short pair: pages in the (memory-mapped) weights, so the baseline is the model's own.
    ddt.score_batch(model, [data[0][0][:8]], [data[0][1][:8]])
    base = rss_mb()
    tokens = sum(len(r) for _, r in data)
    start = time.perf_counter()
    if method == "official":
        phis = [ddt.reference_scores(model, p, r).phi for p, r in data]
    else:
        phis = [t.phi for t in ddt.score_pairs(model, data, max_tokens_per_batch=10**9, max_batch_size=batch_size)]
    seconds = time.perf_counter() - start
    mean_phi = float(torch.cat(phis).mean())
    return {"method": method, "batch": batch_size, "tokens": tokens, "seconds": seconds,
            "tok_s": tokens / seconds, "peak_mb": rss_mb(), "above_model_mb": rss_mb() - base, "mean_phi": mean_phi}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="GSM8K train pairs")
    parser.add_argument("--batch-sizes", default="1,4,16", help="project batch sizes, comma-separated")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "BATCH", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, batch, folder = args.worker
        print(json.dumps(worker(method, args.n, int(batch), folder)))
        return
    folder = str(model_dir())
    runs = [("official", 1)] + [("project", int(b)) for b in args.batch_sizes.split(",")]
    results = []
    for method, batch in runs:
        out = subprocess.run([sys.executable, __file__, "--n", str(args.n), "--worker", method, str(batch), folder],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{r['method']:9s} batch {r['batch']:3d}: {r['tok_s']:7.1f} tok/s  peak {r['peak_mb']:7.0f} MB "
              f"(+{r['above_model_mb']:5.0f} MB over the loaded model)  mean phi {r['mean_phi']:+.4f}", flush=True)
    ref = results[0]
    print(f"\n{args.n} GSM8K train pairs, {ref['tokens']} scored tokens, SmolLM2-135M-Instruct, CPU threads: "
          f"{__import__('torch').get_num_threads()}")
    for r in results[1:]:
        print(f"project batch {r['batch']:3d} / official: {r['tok_s'] / ref['tok_s']:.2f}x tokens/s, "
              f"{r['peak_mb'] / ref['peak_mb']:.2f}x peak RSS, |mean phi diff| {abs(r['mean_phi'] - ref['mean_phi']):.1e}")


if __name__ == "__main__":
    main()
