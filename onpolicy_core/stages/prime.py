"""Stage `prime`: the starting policy every later stage uses (realign, score, train, eval as `base`).

Hinted Decoding can only keep what the policy itself writes, and the DFT/IDFT weight p ** gamma is
tiny on tokens the policy does not yet produce: a policy that never ends its answer with `\\boxed{}`
and EOS leaves both with almost nothing to work on. The paper starts from models that already answer
in the format (Qwen2.5-Math, Qwen2.5-Instruct). Priming gives a small model that habit first: a short
plain SFT on a primer set disjoint from the training, validation and evaluation problems (for the
built-in arithmetic task: the generator under its own seed, every question found in a data split
removed). The built-in primer's solutions are terse equations by default, not the worked sentences of
the training set: primed on the training set's own style, the policy would already write the training
data (the second CPU study measured DDT avg-phi +0.008 on it), leaving On-Policy SFT nothing to do.
Half of the primer (`hinted_share`) is shown in Hinted Decoding's hinted prompt, with the worked
reference: unprimed, the 135M policy miscopies a reference's numbers (37.5% of the study's hinted
rewrites verified), primed so 86.5%, in its own terse style either way.

Writes `<paths.policy>/` (a plain Hugging Face folder: the primed model, or the materialised model's
files when priming is off) and `<paths.prime>/summary.json` + `metrics.json`: the primer set's size
and overlap removed, the training loss, and the raw and the primed model side by side on held-out
primer problems (greedy: lenient and strict accuracy with Wilson 95% intervals, truncation rate,
mean length).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from onpolicy_core.algorithms.grading import grade, grade_boxed
from onpolicy_core.algorithms.options import SolutionStyle
from onpolicy_core.algorithms.prompts import render_hinted_prompt, render_prompt
from onpolicy_core.algorithms.statistics import wilson
from onpolicy_core.data.arithmetic import generate
from onpolicy_core.data.io import InputError, atomic_dir, read_problems, write_json
from onpolicy_core.data.records import Problem
from onpolicy_core.decoding.generation import HFGenerator, SamplingSpec
from onpolicy_core.plumbing.config import (
    DataConfig,
    LoraSettings,
    ModelConfig,
    PathsConfig,
    PrimeConfig,
    TrackingConfig,
    TrainCommon,
    to_dict,
)
from onpolicy_core.plumbing.models import (
    PROVENANCE_FILE,
    TRAINING_DTYPE,
    load_materialised,
    model_identity,
    weights_sha256,
)
from onpolicy_core.plumbing.tracking import stage_run
from onpolicy_core.stages.skeleton import publish, write_run_record
from onpolicy_core.stages.train import common_training_args

log = logging.getLogger(__name__)

SPLITS = ("train.jsonl", "val.jsonl", "eval.jsonl")
"""The data stage's splits the primer set must not share a question with."""


def priming_on(cfg: ModelConfig) -> bool:
    """model.prime.enabled, with 'auto' on for the embedded model only (hub and local models usually
    answer in the format already)."""
    return cfg.prime.enabled == "on" or (cfg.prime.enabled == "auto" and cfg.source == "embedded")


def primer_problems(prime: PrimeConfig, data: DataConfig, taken: set[str]) -> tuple[list[Problem], list[Problem], int]:
    """(training primer, held-out check problems, questions dropped as already in a data split): the
    built-in generator under `prime.seed`, data.arithmetic's shape and `prime.style`, or the records
    of a file."""
    wanted = prime.n + prime.check_n
    if prime.source == "arithmetic":
        # Draw more than needed so that the overlap removed still leaves `wanted` problems.
        pool = _generated(prime, data, prime.style)
    else:
        pool = read_problems(prime.source)
    fresh = [p for p in pool if p.question not in taken]
    dropped = len(pool) - len(fresh)
    if len(fresh) < wanted:
        raise InputError(f"model.prime: only {len(fresh)} primer problems are disjoint from the data splits "
                         f"({dropped} overlap); model.prime.n + check_n needs {wanted}")
    return fresh[: prime.n], fresh[prime.n : wanted], dropped


def _generated(prime: PrimeConfig, data: DataConfig, style: SolutionStyle) -> list[Problem]:
    a = data.arithmetic
    return generate(2 * (prime.n + prime.check_n) + 64, a.min_steps, a.max_steps, a.max_operand, prime.seed, prefix="primer",
                    style=style)


def hinted_examples(prime: PrimeConfig, n: int) -> int:
    """How many of `n` primer problems are shown with their reference: the first `hinted_share`."""
    return round(prime.hinted_share * n)


def primer_rows(tokenizer, problems: list[Problem], prime: PrimeConfig, data: DataConfig, cot_marker: str) -> list[dict]:
    """Prompt/completion rows: the first `hinted_share` of the problems in the hinted prompt of Hinted
    Decoding, up to its CoT marker (the reference: the worked solution for the built-in task, else
    the record's own), the rest in the plain prompt; every completion is the primer solution and EOS."""
    eos = tokenizer.eos_token or ""
    hinted = hinted_examples(prime, len(problems))
    references = {p.id: p.solution for p in _generated(prime, data, "worked")} if prime.source == "arithmetic" and hinted else {}
    rows = []
    for i, p in enumerate(problems):
        if i < hinted:
            prompt = render_hinted_prompt(tokenizer, p.question, references.get(p.id, p.solution), f"{cot_marker}\n")
        else:
            prompt = render_prompt(tokenizer, p.question)
        rows.append({"prompt": prompt, "completion": p.solution + eos})
    return rows


def primer_training(prime: PrimeConfig) -> TrainCommon:
    """What priming is: plain full fine-tuning with SFT, cosine schedule without warm-up, no weight
    decay, gradients clipped at 1; short enough that a killed run simply starts again."""
    return TrainCommon(
        lr_scheduler="cosine", warmup_ratio=0.0, epochs=prime.epochs, max_steps=-1,
        batch_size=prime.batch_size, gradient_accumulation_steps=1, max_length=prime.max_length, weight_decay=0.0,
        max_grad_norm=1.0, gradient_checkpointing=False, lm_head="full", precision="auto", seed=prime.seed,
        save_steps=10**9, save_total_limit=1, logging_steps=1, log_model=False,
        lora=LoraSettings(enabled=False, r=1, alpha=1, dropout=0.0, target_modules="all-linear", merge=True),
    )


def check_policy(model, tokenizer, problems: list[Problem], max_new_tokens: int) -> dict:
    """Greedy lenient and strict accuracy (Wilson 95%), truncation rate and mean length."""
    prompts = [tokenizer(render_prompt(tokenizer, p.question), add_special_tokens=False)["input_ids"] for p in problems]
    spec = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0)
    completions = [row[0] for row in HFGenerator(model, tokenizer, batch_size=32).generate(prompts, spec)]
    lenient = sum(grade(c.text, p.answer).correct for c, p in zip(completions, problems))
    strict = sum(grade_boxed(c.text, p.answer).correct for c, p in zip(completions, problems))
    n = len(problems)

    def estimate(k: int) -> dict:
        e = wilson(k, n)
        return {"value": e.value, "low": e.low, "high": e.high, "n": n}

    return {"accuracy": estimate(lenient), "strict_accuracy": estimate(strict),
            "truncated_rate": sum(c.finish_reason == "length" for c in completions) / n,
            "mean_tokens": sum(len(c.token_ids) for c in completions) / n}


def _train(model, tokenizer, rows: list[dict], prime: PrimeConfig, work: Path, tracking: TrackingConfig):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common_training_args(primer_training(prime), prime.learning_rate, work, tracking), max_length=prime.max_length,
                     completion_only_loss=True, loss_type="nll", packing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    result = trainer.train()
    return trainer.model, result.training_loss, trainer.state.global_step


def run_prime(model_cfg: ModelConfig, data_cfg: DataConfig, paths: PathsConfig, tracking: TrackingConfig,
              cot_marker: str) -> dict:
    """Write the starting policy to paths.policy (primed, or the model's files) and the check;
    `cot_marker` is realign.analysis.marker, where the hinted primer prompts end as realign's do."""
    prime, out, report = model_cfg.prime, Path(paths.policy), Path(paths.prime)
    enabled = priming_on(model_cfg)
    config = {"model": {"prime": to_dict(prime), "source": model_cfg.source}, "enabled": enabled,
              "data": {"arithmetic": to_dict(data_cfg.arithmetic)}, "realign": {"analysis": {"marker": cot_marker}}}
    splits = [Path(paths.data) / name for name in SPLITS]
    with stage_run("prime", config, tracking, inputs=[paths.model, *splits]) as run:
        start = time.perf_counter()
        summary: dict = {"enabled": enabled, "setting": prime.enabled, "source": model_cfg.source}
        if not enabled:
            with atomic_dir(out) as tmp:
                shutil.copytree(paths.model, tmp, dirs_exist_ok=True)
            log.info("priming off (model.prime.enabled %s, model.source %s): %s is %s", prime.enabled, model_cfg.source, out, paths.model)
        else:
            missing = [str(p) for p in splits if not p.is_file()]
            if missing:
                raise InputError(f"model.prime needs the data splits to keep the primer set disjoint; missing {missing}")
            taken = {p.question for f in splits for p in read_problems(f)}
            train, held_out, dropped = primer_problems(prime, data_cfg, taken)
            model, tokenizer = load_materialised(paths.model, dtype=TRAINING_DTYPE)
            summary["raw"] = check_policy(model, tokenizer, held_out, prime.check_max_new_tokens)
            model.train()
            rows = primer_rows(tokenizer, train, prime, data_cfg, cot_marker)
            model, loss, steps = _train(model, tokenizer, rows, prime, report.parent / ".prime.work", tracking)
            model.eval()
            summary["primed"] = check_policy(model, tokenizer, held_out, prime.check_max_new_tokens)
            summary.update(primer_examples=len(train), hinted_examples=hinted_examples(prime, len(train)),
                           check_examples=len(held_out), overlap_dropped=dropped,
                           train_loss=loss, steps=steps)
            with atomic_dir(out) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                write_json(tmp / PROVENANCE_FILE, {"kind": "primed", "from": model_identity(paths.model),
                                                   "prime": to_dict(prime), "weights_sha256": weights_sha256(tmp)})
            shutil.rmtree(report.parent / ".prime.work", ignore_errors=True)
            log.info("primed: strict accuracy %.1f%% -> %.1f%%, truncated %.1f%% -> %.1f%% (%d held-out primer problems)",
                     100 * summary["raw"]["strict_accuracy"]["value"], 100 * summary["primed"]["strict_accuracy"]["value"],
                     100 * summary["raw"]["truncated_rate"], 100 * summary["primed"]["truncated_rate"], len(held_out))
        write_json(report / "summary.json", summary)
        metrics = {"enabled": int(enabled)}
        for which in ("raw", "primed"):
            if which in summary:
                metrics |= {f"{which}.accuracy": summary[which]["accuracy"]["value"],
                            f"{which}.strict_accuracy": summary[which]["strict_accuracy"]["value"],
                            f"{which}.truncated_rate": summary[which]["truncated_rate"]}
        publish(run, report / "metrics.json", metrics, [report / "summary.json"])
        record = {"seconds": round(time.perf_counter() - start, 1), "mlflow_run_id": run.run_id}
        write_run_record(report / "prime", record)
    return summary
