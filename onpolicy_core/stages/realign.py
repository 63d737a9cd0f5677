"""Stage `realign`: Hinted Decoding of the training split (paper Sec. 4), verified and DDT-scored.

Writes, under `<paths.realign>/<variant>/`:
  train.jsonl    the training records after the unverified-answer policy (record format; `solution`
                 is the realigned CoT, or the original under the fallback policy)
  records.jsonl  every example with its realigned CoT, finish reason, tokens, mean lambda,
                 verification (and the rejection reason), avg-phi of the realigned and of the
                 original solution, and outcome
  summary.json / metrics.json   counts per outcome, finish and rejection reason, avg-phi side by side

Verification is strict (`verify`): a realigned response is verified only if it ended with EOS, its
final answer is inside \\boxed{} and equals the gold answer under math-verify, and the repetition
guard did not stop it. A looping response cut off at the length limit whose last number happens to
be the gold answer is rejected, so no training set learns a never-stop habit from it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from onpolicy_core.algorithms import ddt
from onpolicy_core.algorithms.grading import (
    answer_after_box,
    check_arithmetic_steps,
    grade_boxed,
)
from onpolicy_core.algorithms.hinted import MixingOptions, hinted_generate
from onpolicy_core.algorithms.prompts import (
    encode_pair,
    render_hinted_prompt,
    render_prompt,
)
from onpolicy_core.data.io import (
    ShardedResults,
    file_sha256,
    read_problems,
    write_json,
    write_jsonl,
)
from onpolicy_core.data.records import REQUIRED_FIELDS, Problem
from onpolicy_core.decoding.generation import stop_token_ids
from onpolicy_core.plumbing.config import (
    ModelConfig,
    PathsConfig,
    RealignConfig,
    RealignVariant,
    StepCheckMode,
    TrackingConfig,
    output_settings,
    to_dict,
)
from onpolicy_core.stages.skeleton import (
    Shard,
    map_units,
    model_stage,
    n_units,
    publish,
    run_units,
    write_run_record,
)

log = logging.getLogger(__name__)
REJECTIONS = ("repetitive", "truncated", "no_boxed_answer", "wrong_answer", "second_answer", "wrong_step")
"""Why a realigned response is not verified, in the order they are checked."""


def verify(text: str, finish_reason: str, gold: str, step_check: StepCheckMode = "none") -> tuple[bool, str | None, str | None]:
    """(verified, rejection reason or None, boxed answer or None) of one realigned response.
    Beyond the final answer: a different number stated after the box is a `second_answer`, and under
    step_check 'arithmetic' a wrong or disconnected `a op b = c` step is a `wrong_step`."""
    verdict = grade_boxed(text, gold)
    if finish_reason == "repetition":
        return False, "repetitive", verdict.extracted
    if finish_reason != "eos":
        return False, "truncated", verdict.extracted
    if verdict.extracted is None:
        return False, "no_boxed_answer", None
    if not verdict.correct:
        return False, "wrong_answer", verdict.extracted
    if answer_after_box(text) is not None:
        return False, "second_answer", verdict.extracted
    if step_check == "arithmetic" and check_arithmetic_steps(text, verdict.extracted).error is not None:
        return False, "wrong_step", verdict.extracted
    return True, None, verdict.extracted


ANALYSIS_HEADER = "# Analysis\n"


def variant_mixing(cfg: RealignConfig, variant: RealignVariant) -> MixingOptions:
    """The mixing of a variant (realign.mixing.<variant>)."""
    if not hasattr(cfg.mixing, variant):
        raise ValueError(f"unknown realign variant {variant!r}")
    return getattr(cfg.mixing, variant)


def example_seed(seed: int, example_id: str) -> int:
    """Per-example seed, so a sample does not depend on batching or on where a resumed run restarts."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:8], "little") & (2**63 - 1)


@torch.no_grad()
def analysis_prefixes(model, tokenizer, problems: list[Problem], cfg: RealignConfig) -> tuple[list[str], list[bool]]:
    """Assistant prefixes of the hinted stream and whether each analysis reached the CoT marker."""
    marker = cfg.analysis.marker
    if not cfg.analysis.enabled:
        return [f"{marker}\n"] * len(problems), [True] * len(problems)
    prefixes, finished = [], []
    tokenizer.padding_side = "left"
    for start in range(0, len(problems), cfg.batch_size):
        chunk = problems[start : start + cfg.batch_size]
        texts = [render_hinted_prompt(tokenizer, p.question, p.solution, ANALYSIS_HEADER) for p in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=cfg.analysis.max_new_tokens, do_sample=False,
                             stop_strings=[marker], tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1] :]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            end = text.find(marker)
            finished.append(end >= 0)
            body = text[: end + len(marker)] if end >= 0 else text.rstrip() + f"\n\n{marker}"
            prefixes.append(ANALYSIS_HEADER + body + "\n")
    return prefixes, finished


def _hf_decode(model, tokenizer, hinted, plain, seeds, opts, mixing, eos_ids, batch_size: int, bar) -> list:
    """The batched HF generator over pairs sorted by length (longest first)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
    decoded: list = [None] * len(hinted)
    order = sorted(range(len(hinted)), key=lambda i: -(len(hinted[i]) + len(plain[i])))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        outs = hinted_generate(model, [hinted[i] for i in idx], [plain[i] for i in idx], opts, mixing, eos_ids, decode,
                               pad_token_id=tokenizer.pad_token_id or 0, seeds=[seeds[i] for i in idx])
        for i, o in zip(idx, outs):
            decoded[i] = o
        bar.update(len(idx))
    return decoded


def realign_records(model, tokenizer, problems: list[Problem], cfg: RealignConfig, variant: RealignVariant,
                    shards: ShardedResults | None = None, engine=None, units: range | None = None) -> list[dict]:
    """One detail row per problem (input order), computed unit by unit (cfg.work_unit problems) so a
    killed run resumes; only the units in `units` when given (a shard worker).
    With a vLLM `engine` (hinted_vllm.make_engine) pairs decode there; desynced ones on HF."""
    opts, mixing = cfg.decoding, variant_mixing(cfg, variant)
    eos_ids = sorted(stop_token_ids(model, tokenizer))
    todo = len(problems) if units is None else sum(len(problems[u * cfg.work_unit : (u + 1) * cfg.work_unit]) for u in units)
    bar = tqdm(total=todo, desc=f"Hinted Decoding ({variant})", unit="ex", dynamic_ncols=True)
    generated, start = 0, time.perf_counter()

    def realign_shard(chunk: list[Problem]) -> list[dict]:
        nonlocal generated
        prefixes, analysed = analysis_prefixes(model, tokenizer, chunk, cfg)
        hinted = [tokenizer(render_hinted_prompt(tokenizer, p.question, p.solution, pre), add_special_tokens=False)["input_ids"]
                  for p, pre in zip(chunk, prefixes)]
        plain = [tokenizer(render_prompt(tokenizer, p.question), add_special_tokens=False)["input_ids"] for p in chunk]
        seeds = [example_seed(cfg.seed, p.id) for p in chunk]
        if engine is not None:
            from onpolicy_core.decoding.hinted_vllm import vllm_hinted_generate

            decoded = vllm_hinted_generate(engine, hinted, plain, opts, mixing, eos_ids, seeds)
            decoded_by = ["vllm" if d is not None else "hf_after_vllm_desync" for d in decoded]
            redo = [i for i, d in enumerate(decoded) if d is None]
            bar.update(len(chunk) - len(redo))
            if redo:
                log.warning("%d pair(s) lost lockstep on vLLM; recomputing them with the HF generator", len(redo))
                again = _hf_decode(model, tokenizer, [hinted[i] for i in redo], [plain[i] for i in redo],
                                   [seeds[i] for i in redo], opts, mixing, eos_ids, cfg.batch_size, bar)
                for i, d in zip(redo, again):
                    decoded[i] = d
        else:
            decoded = _hf_decode(model, tokenizer, hinted, plain, seeds, opts, mixing, eos_ids, cfg.batch_size, bar)
            decoded_by = ["hf"] * len(chunk)
        generated += sum(len(d.token_ids) for d in decoded)
        bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - start, 1e-9):.0f}")
        texts = [tokenizer.decode(d.token_ids, skip_special_tokens=True).strip() for d in decoded]
        phi_new = _avg_phi(model, tokenizer, chunk, texts)
        phi_old = _avg_phi(model, tokenizer, chunk, [p.solution for p in chunk])
        shard_rows = []
        for p, d, by, text, analysed_ok, a_new, a_old in zip(chunk, decoded, decoded_by, texts, analysed, phi_new, phi_old):
            verified, rejection, boxed = verify(text, d.finish_reason, p.answer, cfg.step_check)
            steps = check_arithmetic_steps(text, boxed) if cfg.step_check == "arithmetic" else None
            shard_rows.append({
                **p.to_dict(),
                "decoded_by": by,
                "realigned": text,
                "finish_reason": d.finish_reason,
                "n_tokens": len(d.token_ids),
                "mean_lambda": d.mean_lambda,
                "switched_at": d.switched_at,
                "answer_boxes": d.switches,
                "step_error": steps.error if steps else None,
                "analysis_finished": analysed_ok,
                "verified": verified,
                "rejection": rejection,
                "boxed_answer": boxed,
                "avg_phi": a_new,
                "avg_phi_original": a_old,
            })
        return shard_rows

    rows = map_units(shards, problems, cfg.work_unit, realign_shard, on_resumed=bar.update, units=units)
    bar.close()
    return rows


def _avg_phi(model, tokenizer, problems: list[Problem], responses: list[str]) -> list[float | None]:
    pairs = [encode_pair(tokenizer, render_prompt(tokenizer, p.question), r) for p, r in zip(problems, responses)]
    scores = ddt.score_pairs(model, pairs, pad_token_id=tokenizer.pad_token_id or 0)
    return [float(s.phi.mean()) if s.phi.numel() else None for s in scores]


def apply_policy(rows: list[dict], policy: str) -> list[dict]:
    """Training records after the unverified policy; sets each row's `outcome`."""
    kept = []
    for r in rows:
        if r["verified"]:
            r["outcome"] = "realigned"
        else:
            r["outcome"] = {"keep": "kept_unverified", "drop": "dropped", "fallback": "fallback_original"}[policy]
        if r["outcome"] == "dropped":
            continue
        solution = r["solution"] if r["outcome"] == "fallback_original" else r["realigned"]
        kept.append({**{k: r[k] for k in REQUIRED_FIELDS}, "solution": solution,
                     "original_solution": r["solution"], "realign_outcome": r["outcome"]})
    return kept


def summarise(rows: list[dict], variant: str, mixing: MixingOptions) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    outcomes: dict[str, int] = {}
    finishes: dict[str, int] = {}
    decoders: dict[str, int] = {}
    rejections = dict.fromkeys(REJECTIONS, 0)
    for r in rows:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        finishes[r["finish_reason"]] = finishes.get(r["finish_reason"], 0) + 1
        decoders[r.get("decoded_by", "hf")] = decoders.get(r.get("decoded_by", "hf"), 0) + 1
        if r["rejection"] is not None:
            rejections[r["rejection"]] += 1
    return {
        "variant": variant,
        "beta": mixing.beta,
        "lambda_mode": mixing.lambda_mode,
        "examples": len(rows),
        "verified_rate": mean([float(r["verified"]) for r in rows]),
        "eos_rate": mean([float(r["finish_reason"] == "eos") for r in rows]),
        "outcomes": outcomes,
        "finish_reasons": finishes,
        "rejections": rejections,
        "decoded_by": decoders,
        "answer_marker_reached": sum(r["switched_at"] is not None for r in rows),
        "analysis_unfinished": sum(not r["analysis_finished"] for r in rows),
        "mean_tokens": mean([r["n_tokens"] for r in rows]),
        "mean_lambda": mean([r["mean_lambda"] for r in rows]),
        "avg_phi": {"original": mean([r["avg_phi_original"] for r in rows]), variant: mean([r["avg_phi"] for r in rows]),
                    f"{variant}_verified": mean([r["avg_phi"] for r in rows if r["verified"]])},
    }


def run_realign(cfg: RealignConfig, paths: PathsConfig, tracking: TrackingConfig, model_cfg: ModelConfig, variant: RealignVariant,
                input_path: str | Path | None = None, output_dir: str | Path | None = None,
                shard: Shard | None = None, merge: bool = False) -> dict | None:
    """Realign the input (whole), one shard's units of it (`shard`: no outputs, returns None), or
    write the outputs from every shard's units (`merge`). The policy decodes in `model.dtype`, on HF
    and on vLLM alike."""
    input_path = Path(input_path or Path(paths.data) / "train.jsonl")
    out = Path(output_dir or Path(paths.realign) / variant)
    problems = read_problems(input_path)
    mixing = variant_mixing(cfg, variant)
    # Only what this variant reads: the other variant's mixing does not touch its fingerprint.
    config = {"realign": {k: v for k, v in output_settings(cfg).items() if k != "mixing"}, "mixing": to_dict(mixing),
              "variant": variant, "input": str(input_path), "dtype": model_cfg.dtype}
    fingerprint = {"config": config, "input": file_sha256(input_path)}
    with model_stage("realign", config | {"workers": cfg.workers}, tracking, out=out, model_dir=paths.policy, fingerprint=fingerprint,
                     inputs=[paths.policy, input_path], run_name=f"realign-{variant}", dtype=model_cfg.dtype, shard=shard,
                     merge=merge) as stage:

        def realign_units(units: range) -> list[dict]:
            engine = None
            if cfg.backend == "vllm":
                from onpolicy_core.decoding.generation import (
                    VLLM_MISSING,
                    BackendUnavailable,
                )

                try:
                    from onpolicy_core.decoding.hinted_vllm import make_engine
                except ImportError as exc:
                    raise BackendUnavailable(f"realign.{VLLM_MISSING}") from exc
                engine = make_engine(str(paths.policy), cfg.vllm, dtype=model_cfg.dtype, seed=cfg.seed)
            return realign_records(stage.model, stage.tokenizer, problems, cfg, variant, stage.shards, engine, units)

        done = run_units(stage, out, n_units(len(problems), cfg.work_unit), realign_units, shard=shard, merge=merge)
        if done is None:
            return None
        rows, timing = done.rows, done.timing()
        train = apply_policy(rows, cfg.on_unverified)
        summary = summarise(rows, variant, mixing)
        summary["train_examples"] = len(train)
        summary["dtype"] = model_cfg.dtype
        write_jsonl(out / "records.jsonl", rows)
        write_jsonl(out / "train.jsonl", train)
        write_json(out / "summary.json", summary)
        metrics = {
            "verified_rate": summary["verified_rate"], "eos_rate": summary["eos_rate"], "train_examples": len(train),
            "mean_tokens": summary["mean_tokens"],
            "mean_lambda": summary["mean_lambda"], "avg_phi_original": summary["avg_phi"]["original"],
            "avg_phi_realigned": summary["avg_phi"][variant],
            **{f"outcome.{k}": v for k, v in summary["outcomes"].items()},
            **{f"finish.{k}": v for k, v in summary["finish_reasons"].items()},
            **{f"rejected.{k}": v for k, v in summary["rejections"].items()},
            **{f"decoded_by.{k}": v for k, v in summary["decoded_by"].items()},
        }
        headline = {k: metrics[k] for k in ("verified_rate", "eos_rate", "train_examples", "avg_phi_realigned")}
        publish(stage.run, out / "metrics.json", headline, [out / "summary.json", out / "records.jsonl"],
                logged=metrics | timing)
        write_run_record(out, done.record(stage.run))
        log.info("realign %s: %d/%d verified, avg-phi original %.3f -> %s %.3f", variant,
                 sum(r["verified"] for r in rows), len(rows), summary["avg_phi"]["original"] or float("nan"),
                 variant, summary["avg_phi"][variant] or float("nan"))
    return summary
