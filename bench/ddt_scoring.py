"""Benchmark: DDT scoring of real GSM8K pairs with the embedded model, the official way and ours.

  official  the official `PhiCalculator` control flow, written here: one example at a time, the
            model's full forward (LM head at every position), the logits sliced to the response
            positions, then log-softmax, softmax and entropy over the whole vocabulary in fp32
  project   `onpolicy_core.algorithms.ddt.score_pairs`: LM head only on response positions, in chunks;
            layout `unpadded` (each row at its own length, position ids, no pad tokens) or
            `padded` (one right-padded forward per batch); fp32 or bf16 autocast

Two answer lengths: `short`, the GSM8K train solutions as they are (~120 tokens), and `long`,
~1,000-token answers made of consecutive GSM8K train solutions joined (real text, no padding
tricks). Protocol of bench/common.py: own process per variant, warm-up, median of --reps, peak
memory from a second process with a fixed allocator threshold (`run_variant`). Prints tokens/s,
the fraction of the fp32 compute bound, peak memory above the loaded model, the ratio to
`official`, and each variant's max |phi - phi_official| on the same tokens.

    .venv/bin/python bench/ddt_scoring.py                 # both lengths, every variant (~25 min)
    .venv/bin/python bench/ddt_scoring.py --lengths short --reps 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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

LONG_TOKENS = 1000


def pairs(length: str, n: int, tokenizer) -> list[tuple[list[int], list[int]]]:
    """`n` (prompt ids, response ids) pairs: GSM8K train solutions (short), or for `long` each
    question with its solution followed by the next ones' until the answer is >= LONG_TOKENS."""
    from onpolicy_core.algorithms.prompts import encode_pair, render_prompt

    problems = gsm8k(GSM8K_TRAIN)
    if length == "short":
        return [encode_pair(tokenizer, render_prompt(tokenizer, p.question), p.solution) for p in problems[:n]]
    out, cursor = [], 0
    for _ in range(n):
        question, parts = problems[cursor].question, []
        while len(tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"]) < LONG_TOKENS:
            parts.append(problems[cursor].solution)
            cursor += 1
        out.append(encode_pair(tokenizer, render_prompt(tokenizer, question), "\n\n".join(parts)))
    return out


def official_phi(model, prompt: list[int], response: list[int], temperature: float = 1.0):
    """phi of one pair as the official `PhiCalculator` computes it (its control flow, not its code)."""
    import torch

    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0] + entropy


def worker(spec: dict) -> dict:
    import torch

    from onpolicy_core.algorithms import ddt
    from onpolicy_core.plumbing.models import load_materialised

    torch.manual_seed(0)
    model, tok = load_materialised(spec["model"], dtype="float32")
    data = pairs(spec["length"], spec["n"], tok)
    with torch.no_grad():
        model(input_ids=torch.tensor([data[0][0][:8]]))  # pages in the memory-mapped weights
    base = rss_mb()
    if spec["method"] == "official":
        def run():
            with torch.no_grad():
                return [official_phi(model, p, r) for p, r in data]
    else:
        def run():
            return [s.phi for s in ddt.score_pairs(model, data, max_tokens_per_batch=10**9, max_batch_size=spec["batch"],
                                                    layout=spec["layout"], precision=spec["precision"],
                                                    pad_token_id=tok.pad_token_id or 0)]
    timing = median_time(run, spec["reps"])
    seconds, times, phi = timing["seconds"], timing["times"], torch.cat(timing["result"])
    torch.save({"phi": phi, "lengths": [len(r) for _, r in data]}, spec["phi_out"])
    tokens = sum(len(r) for _, r in data)
    return {**{k: v for k, v in spec.items() if k not in ("model", "phi_out")}, "tokens": tokens,
            "prompt_tokens": sum(len(p) for p, _ in data), "seconds": round(seconds, 3), "times": [round(t, 3) for t in times],
            "tok_s": round(tokens / seconds, 1), "peak_mb": round(rss_mb()), "above_model_mb": round(rss_mb() - base),
            "mean_phi": float(phi.mean()), "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


VARIANTS = {  # (method, batch, layout, precision)
    "short": [("official", 1, "-", "fp32"), ("project", 1, "unpadded", "fp32"), ("project", 16, "unpadded", "fp32"),
              ("project", 32, "unpadded", "fp32"), ("project", 16, "padded", "fp32"), ("project", 16, "unpadded", "bf16")],
    "long": [("official", 1, "-", "fp32"), ("project", 1, "unpadded", "fp32"), ("project", 8, "unpadded", "fp32"),
             ("project", 8, "padded", "fp32"), ("project", 8, "unpadded", "bf16")],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="short,long")
    parser.add_argument("--n-short", type=int, default=32, help="pairs with short (~120-token) answers")
    parser.add_argument("--n-long", type=int, default=8, help="pairs with ~1,000-token answers")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (median)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        emit(worker(json.loads(args.worker)))
        return
    import torch

    facts = machine_facts()
    print_facts(facts)
    folder, scratch = str(model_dir()), Path(tempfile.mkdtemp())
    results = []
    for length in args.lengths.split(","):
        n = args.n_short if length == "short" else args.n_long
        official = None
        for method, batch, layout, precision in VARIANTS[length]:
            phi_out = scratch / f"{length}-{method}-{batch}-{layout}-{precision}.pt"
            r = run_variant(__file__, {"method": method, "length": length, "n": n, "batch": batch, "layout": layout,
                                       "precision": precision, "reps": args.reps, "model": folder, "phi_out": str(phi_out)})
            saved = torch.load(phi_out)
            phi, lengths = saved["phi"], saved["lengths"]
            official = official or (r, phi)
            r["vs_official"] = round(r["tok_s"] / official[0]["tok_s"], 2)
            diff = (phi - official[1]).abs()
            # Per token, and per example on its avg-phi (what selection and the report read).
            per_example = torch.stack([d.mean() for d in (phi - official[1]).split(lengths)]).abs()
            r["max_abs_phi_diff"], r["mean_abs_phi_diff"] = float(diff.max()), float(diff.mean())
            r["max_abs_avg_phi_diff"] = float(per_example.max())
            # The issue's bound: 2 x parameters FLOP per scored token at the measured fp32 matmul rate.
            r["compute_bound_fraction"] = round(r["tok_s"] * 2 * r["params"] / (facts["matmul_fp32_gflops"] * 1e9), 3)
            results.append(r)
            print(f"{length:5s} {method:8s} b{batch:<3d} {layout:8s} {precision}: {r['tok_s']:7.1f} tok/s "
                  f"({r['compute_bound_fraction']:.0%} of bound)  {r['vs_official']:.2f}x official  "
                  f"+{r['above_model_mb']:5d} MB over the model  |dphi| max {r['max_abs_phi_diff']:.1e} mean {r['mean_abs_phi_diff']:.1e}, "
                  f"avg-phi max {r['max_abs_avg_phi_diff']:.1e}", flush=True)
        print(f"      {n} pairs, {official[0]['tokens']} scored tokens after {official[0]['prompt_tokens']} prompt tokens", flush=True)
    out = save_results("ddt_scoring", {"command": "python bench/ddt_scoring.py " + " ".join(sys.argv[1:]),
                                       "machine": facts, "reps": args.reps, "results": results})
    print(f"-> {out}")


if __name__ == "__main__":
    main()
