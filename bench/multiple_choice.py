"""Benchmark: multiple-choice log-likelihood scoring, the naive method against `onpolicy_core.algorithms.choices`.

  naive      lm-eval's method: one full forward of context + continuation per choice (full logits,
             fp32 softmax) = `choices.reference_logprob` per choice
  cached-b1  `choices.score_questions`, one question per batch: the context once, its choices as rows
             on the expanded KV cache, the LM head on the scored positions only
  cached-b8  the same, 8 questions per batch (general.batch_size's default)

The first --n real ARC-Easy test questions (cloze prompt, tokenised as the general stage does) with
the embedded SmolLM2-135M-Instruct in fp32. Protocol of bench/common.py: own process per variant,
warm-up (on the first 8 questions), median of --reps. Prints questions/s and checks that every variant gives the naive method's
predictions and log-probabilities.

    .venv/bin/python bench/multiple_choice.py --n 50 --reps 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    emit,
    machine_facts,
    median_time,
    model_dir,
    print_facts,
    rss_mb,
    run_worker,
    save_results,
)

DATA = ROOT.parent / "shared" / "data"


def worker(spec: dict) -> dict:
    from onpolicy_core.algorithms.choices import (
        encode_question,
        predictions,
        reference_logprob,
        score_questions,
    )
    from onpolicy_core.data.multiple_choice import (
        context,
        continuations,
        load_choice_set,
    )
    from onpolicy_core.plumbing.models import load_materialised

    model, tok = load_materialised(spec["model"], dtype="float32")
    questions = load_choice_set("arc_easy", DATA, spec["n"], "first", 0).questions
    encoded = [encode_question(tok, context(q), continuations(q)) for q in questions]
    if spec["method"] == "naive":
        def run(todo=encoded):
            return [[reference_logprob(model, ctx, c) for c in conts] for ctx, conts, _ in todo]
    else:
        def run(todo=encoded):
            scores = score_questions(model, [e[0] for e in todo], [e[1] for e in todo], batch_size=spec["batch_size"],
                                     pad_token_id=tok.pad_token_id or 0)
            return [s.logprobs.tolist() for s in scores]
    # Warm-up on the first batch's questions: the naive loop over all of them takes minutes on 2 cores.
    timing = median_time(run, spec["reps"], warmup=lambda: run(encoded[:8]))
    import torch

    from onpolicy_core.algorithms.choices import ChoiceScores

    logprobs = timing["result"]
    preds = [predictions(ChoiceScores(torch.tensor(lp), torch.zeros(len(lp))), [len(c) for c in q.choices])
             for q, lp in zip(questions, logprobs)]
    return {**{k: v for k, v in spec.items() if k != "model"}, "seconds": round(timing["seconds"], 3), "times": timing["times"],
            "questions_per_second": round(len(questions) / timing["seconds"], 2), "peak_mb": round(rss_mb()),
            "logprobs": logprobs, "preds": preds, "acc": sum(p[0] == q.answer for p, q in zip(preds, questions)) / len(questions)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-facts", action="store_true", help="skip the matmul-rate facts (slow where bf16 is emulated)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        emit(worker(json.loads(args.worker)))
        return
    facts = {} if args.no_facts else machine_facts()
    if facts:
        print_facts(facts)
    folder = str(model_dir())
    results = {}
    for method, batch in (("naive", 1), ("cached-b1", 1), ("cached-b8", 8)):
        r = run_worker(__file__, {"method": method, "batch_size": batch, "n": args.n, "reps": args.reps, "model": folder})
        results[method] = r
        print(f"{method:10s} {args.n} questions: {r['seconds']:.2f} s ({r['questions_per_second']:.1f} questions/s), "
              f"peak {r['peak_mb']} MB", flush=True)
    naive = results["naive"]
    for method, r in results.items():
        r["speedup_vs_naive"] = round(naive["seconds"] / r["seconds"], 2)
        r["max_abs_logprob_diff_vs_naive"] = max(abs(a - b) for x, y in zip(r["logprobs"], naive["logprobs"]) for a, b in zip(x, y))
        r["same_predictions_as_naive"] = f"{sum(a == b for a, b in zip(r['preds'], naive['preds']))}/{len(r['preds'])}"
        print(f"{method:10s}: {r['speedup_vs_naive']:.2f}x naive; max |d logprob| {r['max_abs_logprob_diff_vs_naive']:.2e}; "
              f"predictions (acc, acc_norm) identical: {r['same_predictions_as_naive']}; acc {r['acc']:.3f}")
    out = save_results("multiple_choice", {"command": "python bench/multiple_choice.py " + " ".join(sys.argv[1:]), "machine": facts,
                                           "reps": args.reps, "n": args.n,
                                           "results": {m: {k: v for k, v in r.items() if k not in ("logprobs", "preds")}
                                                       for m, r in results.items()}})
    print(f"-> {out}")


if __name__ == "__main__":
    main()
