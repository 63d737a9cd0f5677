"""Benchmark: seconds per optimizer step and peak memory of the token-weighted losses on TRL with
the embedded model and real GSM8K train sequences, in one run.

  <method>:full    `TokenWeightedSFTTrainer` with `train.common.lm_head: full` (full logits, a float32
                   softmax over the vocabulary; the default)
  <method>:fused   the same on TRL's fused LM head (per-token log p and entropy in tiles, never the
                   full logits)
  idft-naive       the straightforward IDFT of the official trainer, written here: full logits,
                   softmax and log-softmax over the vocabulary at every position

for method sft (plain NLL) and idft. Each variant runs in its own process (its own peak RSS); the
first optimizer step is a warm-up, and the median of the --steps timed steps is reported (the same
batches for every variant). Prints the ratios against sft:full.

    .venv/bin/python bench/train_losses.py --steps 5 --batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    GSM8K_TRAIN,
    emit,
    gsm8k,
    machine_facts,
    model_dir,
    print_facts,
    rss_mb,
    run_worker,
    save_results,
)


def naive_idft_trainer_class():
    import torch

    from onpolicy_core.algorithms.options import IDFTOptions
    from onpolicy_core.training.sft import TokenWeightedSFTTrainer

    class NaiveIDFTTrainer(TokenWeightedSFTTrainer):
        """Full logits and full softmax at every position, as the official verl trainer does."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"][:, 1:]
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits[:, :-1].float()
            probs = torch.softmax(logits, -1)
            logprobs = torch.log_softmax(logits, -1)
            entropy = -(probs * logprobs).sum(-1)
            mask = labels != -100
            log_p = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            p: IDFTOptions = self.idft
            gamma = 1 + self.idft_lambda_now() * (torch.clamp(torch.exp(-(log_p + entropy) / p.beta), p.gamma_min, p.gamma_max) - 1)
            prob = torch.clamp(probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 1e-10, 1.0)
            loss = -(prob ** gamma).detach() * torch.log(prob)
            return (loss * mask).sum() / mask.sum().clamp(min=1)

    return NaiveIDFTTrainer


def worker(method: str, steps: int, batch: int, folder: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig

    from onpolicy_core.algorithms.prompts import render_prompt
    from onpolicy_core.plumbing.models import load_materialised
    from onpolicy_core.training.sft import TokenWeightedSFTTrainer

    torch.manual_seed(0)
    model, tok = load_materialised(folder, dtype="float32")
    problems = gsm8k(GSM8K_TRAIN)[: batch * (steps + 1)]
    rows = [{"prompt": render_prompt(tok, p.question), "completion": p.solution + tok.eos_token} for p in problems]
    times: list[float] = []
    marks = {"base": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks["t"] = time.perf_counter()
            if state.global_step == 1:
                marks["base"] = rss_mb()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > 1:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - marks["t"])

    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps + 1, per_device_train_batch_size=batch, learning_rate=1e-5,
                     logging_steps=1000, save_strategy="no", report_to=[], max_length=512, completion_only_loss=True,
                     loss_type="nll", dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=False)
    import dataclasses

    from onpolicy_core.plumbing.config import default_params

    train = default_params().train
    cls = naive_idft_trainer_class() if method == "idft-naive" else TokenWeightedSFTTrainer
    loss, _, head = method.replace("-naive", "").partition(":")
    trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                  method=loss, callbacks=[Clock()], lm_head=head or "full",
                  idft=dataclasses.replace(train.idft, warmup_ratio=0.0, transition_ratio=0.0), eaft=train.eaft)
    trainer.train()
    tokens = sum(len(tok(r["prompt"] + r["completion"])["input_ids"]) for r in rows) / len(rows)
    return {"method": method, "s_per_step": statistics.median(times), "times": [round(t, 3) for t in times], "peak_mb": rss_mb(),
            "above_start_mb": rss_mb() - marks["base"], "mean_seq_tokens": tokens, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        emit(worker(spec["method"], spec["steps"], spec["batch"], spec["model"]))
        return
    facts = machine_facts()
    print_facts(facts)
    folder = str(model_dir())
    results = {}
    for method in ("sft:full", "sft:fused", "idft:full", "idft:fused", "idft-naive"):
        r = run_worker(__file__, {"method": method, "steps": args.steps, "batch": args.batch, "model": folder})
        results[method] = r
        print(f"{method:10s}: {r['s_per_step']:6.2f} s/step  peak {r['peak_mb']:6.0f} MB", flush=True)
    base = results["sft:full"]
    print(f"\nSmolLM2-135M-Instruct float32, GSM8K train, batch {args.batch}, ~{base['mean_seq_tokens']:.0f} tokens/sequence, "
          f"{args.steps} timed steps, CPU threads {base['threads']}")
    for m, r in results.items():
        r["time_vs_sft_full"] = round(r["s_per_step"] / base["s_per_step"], 2)
        r["memory_vs_sft_full"] = round(r["peak_mb"] / base["peak_mb"], 2)
        print(f"{m:10s} / sft:full: {r['time_vs_sft_full']:.2f}x time per step, {r['memory_vs_sft_full']:.2f}x peak RSS")
    for loss in ("sft", "idft"):
        print(f"{loss}: fused / full head {results[loss + ':fused']['s_per_step'] / results[loss + ':full']['s_per_step']:.2f}x time per step")
    out = save_results("train_losses", {"command": "python bench/train_losses.py " + " ".join(sys.argv[1:]), "machine": facts,
                                        "batch": args.batch, "steps": args.steps, "results": results})
    print(f"-> {out}")


if __name__ == "__main__":
    main()
