"""Benchmark: seconds per optimizer step and peak memory of the token-weighted losses on TRL with
the embedded model and real GSM8K train sequences, in one run.

  nll, dft, idft   `TokenWeightedSFTTrainer` on TRL's fused LM head (per-token log p and entropy in
                   tiles; no full-vocabulary probability tensor)
  idft-naive       the straightforward IDFT of the official trainer: full logits, a float32 softmax
                   and log-softmax over the vocabulary at every position

Each method runs in its own process (its own peak RSS); the first optimizer step is a warm-up and
is not timed. Prints the ratios against nll.

    .venv/bin/python bench/train_losses.py --steps 3 --batch 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from ddt_scoring import GSM8K_TRAIN, gsm8k, model_dir, rss_mb  # noqa: E402


def naive_idft_trainer_class():
    import torch

    from onpolicy_core.options import IDFTOptions
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

    from onpolicy_core.models import load_materialised
    from onpolicy_core.prompts import render_prompt
    from onpolicy_core.training.sft import TokenWeightedSFTTrainer

    torch.manual_seed(0)
    model, tok = load_materialised(folder)
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

    from onpolicy_core.config import default_params

    train = default_params().train
    cls = naive_idft_trainer_class() if method == "idft-naive" else TokenWeightedSFTTrainer
    trainer = cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                  method="sft" if method == "nll" else method.replace("-naive", ""), callbacks=[Clock()],
                  idft=dataclasses.replace(train.idft, warmup_ratio=0.0, transition_ratio=0.0), eaft=train.eaft)
    trainer.train()
    tokens = sum(len(tok(r["prompt"] + r["completion"])["input_ids"]) for r in rows) / len(rows)
    return {"method": method, "s_per_step": sum(times) / len(times), "peak_mb": rss_mb(),
            "above_start_mb": rss_mb() - marks["base"], "mean_seq_tokens": tokens, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.steps, args.batch, args.worker[1])))
        return
    folder = str(model_dir())
    results = {}
    for method in ("nll", "dft", "idft", "idft-naive"):
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch), "--worker", method, folder]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        results[method] = r
        print(f"{method:10s}: {r['s_per_step']:6.2f} s/step  peak {r['peak_mb']:6.0f} MB", flush=True)
    base = results["nll"]
    print(f"\nSmolLM2-135M-Instruct float32, GSM8K train, batch {args.batch}, ~{base['mean_seq_tokens']:.0f} tokens/sequence, "
          f"{args.steps} timed steps, CPU threads {base['threads']}")
    for m in ("dft", "idft", "idft-naive"):
        r = results[m]
        print(f"{m} / nll: {r['s_per_step'] / base['s_per_step']:.2f}x time per step, {r['peak_mb'] / base['peak_mb']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
