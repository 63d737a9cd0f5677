"""Stage `train`: one <method>-<data> run on TRL, saved as a plain HF model folder.

Methods dispatch through `TRAINERS`, a plain dict: sft/dft/eaft/idft share the token-weighted
`SFTTrainer` subclass; dpo uses TRL's `DPOTrainer`; simpo uses TRL's `CPOTrainer` with
loss_type='simpo' and cpo_alpha=0. The learning rate is the one the tune stage chose for the method
(<paths.tune>/<method>/best.json: fixed by hand or tuned on the validation split). Checkpoints live
outside the DVC output, so a killed run resumes from its last checkpoint (optimizer, scheduler, step and
so IDFT's lambda schedule included). The tune stage trains its trials with the same pieces
(`training_rows`, `make_trainer`, `trained_model`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from onpolicy_core.algorithms.grading import grade
from onpolicy_core.algorithms.prompts import render_prompt
from onpolicy_core.data.io import (
    InputError,
    atomic_dir,
    atomic_path,
    claim_work_dir,
    file_sha256,
    read_problems,
    write_json,
)
from onpolicy_core.data.records import Problem
from onpolicy_core.decoding.generation import HFGenerator, SamplingSpec, VLLMGenerator
from onpolicy_core.plumbing.config import (
    TUNED,
    PathsConfig,
    TrackingConfig,
    TrainCommon,
    TrainConfig,
    TuneConfig,
    method_params,
    parse_run,
    rate_file,
    run_seed,
    to_dict,
    training_file,
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
from onpolicy_core.training.preference import build_pairs
from onpolicy_core.training.sft import TokenWeightedSFTTrainer

log = logging.getLogger(__name__)


def _precision(cfg: TrainCommon) -> dict:
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return {"bf16": bf16, "fp16": False}


def common_training_args(cfg: TrainCommon, learning_rate: float, out: Path, tracking: TrackingConfig) -> dict:
    """TrainingArguments shared by every method; every default that changes the math is explicit."""
    return dict(
        output_dir=str(out),
        learning_rate=learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        report_to=["mlflow"] if tracking.enabled else [],
        disable_tqdm=False,
        dataloader_num_workers=0,
        # Several processes and no GPU (torchrun / accelerate on CPUs): transformers only joins them
        # over gloo when told to use the CPU; a single process keeps its own device choice.
        use_cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        **_precision(cfg),
    )


def _peft_config(cfg: TrainCommon):
    if not cfg.lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


def _sft_rows(tokenizer, problems: list[Problem], summary: dict) -> list[dict]:
    rows = [{"prompt": render_prompt(tokenizer, p.question), "completion": p.solution + (tokenizer.eos_token or "")} for p in problems]
    summary["examples"] = len(rows)
    return rows


def _sft_trainer(method: str, cfg: TrainConfig, learning_rate: float, model, tokenizer, rows: list[dict], out: Path,
                 tracking: TrackingConfig):
    from datasets import Dataset
    from trl import SFTConfig

    args = SFTConfig(**common_training_args(cfg.common, learning_rate, out, tracking), max_length=cfg.common.max_length,
                     completion_only_loss=True, loss_type="nll", packing=False)
    return TokenWeightedSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=_peft_config(cfg.common), method=method, idft=cfg.idft, eaft=cfg.eaft, lm_head=cfg.common.lm_head,
    )


def _preference_rows(model, tokenizer, model_dir: Path, problems: list[Problem], cfg: TrainConfig, summary: dict) -> list[dict]:
    """Chosen/rejected pairs from graded samples of `model` (the model before training, saved in
    `model_dir`: what a vLLM sampler loads)."""
    from tqdm import tqdm

    pc = cfg.preference
    prompts = [render_prompt(tokenizer, p.question) for p in problems]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    spec = SamplingSpec(pc.samples_per_prompt, pc.temperature, pc.top_p, pc.max_new_tokens, cfg.common.seed)
    if pc.backend == "vllm":  # the weights training starts from, in the dtype it trains in
        sampler = VLLMGenerator(str(model_dir), tokenizer, pc.vllm, dtype=TRAINING_DTYPE, seed=cfg.common.seed)
    else:
        sampler = HFGenerator(model, tokenizer, batch_size=8 * pc.samples_per_prompt)
    start = time.perf_counter()
    try:
        with tqdm(total=len(prompts), desc=f"sampling preference candidates ({sampler.name})", unit="prompt") as bar:
            completions = sampler.generate(prompt_ids, spec, progress=bar)
    finally:
        sampler.close()
    summary["sampler"] = sampler.name
    log.info("sampled %d preference candidates with %s in %.0f s", sum(map(len, completions)), sampler.name, time.perf_counter() - start)
    samples = [[c.text for c in row] for row in completions]
    correct = [[grade(t, p.answer).correct for t in texts] for texts, p in zip(samples, problems)]
    pairs, counts = build_pairs(samples, correct, [p.solution for p in problems], pc.no_correct)
    summary["pairs"] = len(pairs)
    summary["pair_outcomes"] = dict(counts)
    summary["sample_accuracy"] = sum(map(sum, correct)) / max(1, sum(map(len, correct)))
    if not pairs:
        raise ValueError(f"no preference pairs could be built ({dict(counts)}); try more samples_per_prompt or no_correct='reference'")
    eos = tokenizer.eos_token or ""
    return [{"prompt": prompts[q.index], "chosen": q.chosen + eos, "rejected": q.rejected + eos} for q in pairs]


def _dpo_trainer(method, cfg, learning_rate, model, tokenizer, rows, out, tracking):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common_training_args(cfg.common, learning_rate, out, tracking), beta=cfg.preference.dpo_beta,
                     loss_type=[cfg.preference.dpo_loss_type], max_length=cfg.common.max_length)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=_peft_config(cfg.common))


def _simpo_trainer(method, cfg, learning_rate, model, tokenizer, rows, out, tracking):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    pc = cfg.preference
    args = CPOConfig(**common_training_args(cfg.common, learning_rate, out, tracking), loss_type="simpo", cpo_alpha=pc.cpo_alpha,
                     beta=pc.simpo_beta, simpo_gamma=pc.simpo_gamma, max_length=cfg.common.max_length)
    return CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=_peft_config(cfg.common))


TRAINERS = {
    "sft": _sft_trainer,
    "dft": _sft_trainer,
    "eaft": _sft_trainer,
    "eaft_full": _sft_trainer,
    "idft": _sft_trainer,
    "dpo": _dpo_trainer,
    "simpo": _simpo_trainer,
}
"""The trainer of each method: (method, cfg, learning_rate, model, tokenizer, rows, out, tracking) -> trainer."""


def training_rows(method: str, cfg: TrainConfig, model, tokenizer, model_dir: Path, problems: list[Problem],
                  summary: dict) -> list[dict]:
    """The method's training rows: prompt/completion for the token-weighted methods; for DPO/SimPO,
    pairs sampled from `model` (loaded from `model_dir`) before it trains (the tune stage samples
    them once for all trials)."""
    if TRAINERS[method] is _sft_trainer:
        return _sft_rows(tokenizer, problems, summary)
    return _preference_rows(model, tokenizer, model_dir, problems, cfg, summary)


def make_trainer(method: str, cfg: TrainConfig, learning_rate: float, model, tokenizer, rows: list[dict], out: Path,
                 tracking: TrackingConfig):
    """The TRL trainer of `method` at `learning_rate`, checkpointing into `out`."""
    return TRAINERS[method](method, cfg, learning_rate, model, tokenizer, rows, out, tracking)


def trained_model(trainer, common: TrainCommon):
    """The trained model as it is saved (LoRA adapters merged when train.common.lora.merge)."""
    trained = trainer.model
    if common.lora.enabled and common.lora.merge:
        trained = trained.merge_and_unload()
    return trained


def read_learning_rate(paths: PathsConfig, key: str, tune: TuneConfig | None = None) -> tuple[float, str]:
    """(rate, 'fixed' | 'tuned') from the tune stage's best.json of tune.learning_rates entry `key`. With
    `tune`, a file that no longer matches its setting (another fixed number, or fixed vs tuned, or
    another grid) is an error rather than a silent stale rate."""
    path = Path(rate_file(paths, key))
    if not path.is_file():
        raise InputError(f"{path}: no learning rate for {key!r}; run `onpolicy tune --method {key}` (or `dvc repro tune@{key}`)")
    best = json.loads(path.read_text())
    if tune is not None and key in tune.learning_rates:
        setting = tune.learning_rates[key].rate
        stale = (best["source"] != "tuned" or best["grid"] != tune.grid_of(key)) if setting == TUNED else \
            (best["source"] != "fixed" or best["learning_rate"] != setting)
        if stale:
            raise InputError(f"{path}: chosen under other settings (source {best['source']}, rate {best['learning_rate']}) than "
                             f"tune.learning_rates.{key} = {setting}; rerun `onpolicy tune --method {key}`")
    return float(best["learning_rate"]), best["source"]


def plot_diagnostics(log_history: list[dict], path: Path, title: str, ranges: dict[str, tuple[float, float]]) -> bool:
    """Loss curve and, for IDFT, the per-step 10-bin histograms of phi and gamma as heatmaps over
    their value `ranges`. Returns False when there is nothing to plot."""
    steps = [e for e in log_history if "loss" in e and "step" in e]
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [name for name in ("phi", "gamma") if f"idft/{name}_bin_0_ratio" in steps[0]]
    # The loss above, the IDFT heatmaps side by side below: under 900 px wide, so `dvc plots show`
    # fits it in its page without cutting the right edge.
    fig = plt.figure(figsize=(9.6, 6.8 if panels else 3.4))
    layout = fig.add_gridspec(2 if panels else 1, max(1, len(panels)))
    loss_ax = fig.add_subplot(layout[0, :])
    loss_ax.plot([e["step"] for e in steps], [e["loss"] for e in steps], marker="o", ms=3)
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    for column, name in enumerate(panels):
        ax = fig.add_subplot(layout[1, column])
        grid = np.array([[e[f"idft/{name}_bin_{b}_ratio"] for b in range(10)] for e in steps]).T
        low, high = ranges[name]
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis",
                          extent=(steps[0]["step"] - 0.5, steps[-1]["step"] + 0.5, low, high))
        ax.set(title=f"{name}: share of tokens per bin", xlabel="step", ylabel=name)
        fig.colorbar(image, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return True


def _last_checkpoint(folder: Path, fingerprint: dict) -> str | None:
    """The checkpoint to resume from: only one made under the same settings, data and base model.
    Checkpoints made under anything else are discarded (one log line says why)."""
    from transformers.trainer_utils import get_last_checkpoint

    if folder.is_dir() and not any(folder.glob("checkpoint-*")):
        shutil.rmtree(folder)  # nothing to resume (the trainer creates its output folder up front)
    changed = claim_work_dir(folder, fingerprint)
    if changed:
        log.info("discarding the checkpoints in %s: made under other %s; starting fresh", folder, ", ".join(changed))
    return get_last_checkpoint(str(folder))


def _method_options(method: str, cfg: TrainConfig) -> dict:
    """The options block the method reads (what its DVC stage lists besides train.common)."""
    block = method_params(method).removeprefix("train.")
    return {block: to_dict(getattr(cfg, block))} if block != "common" else {}


def run_train(cfg: TrainConfig, paths: PathsConfig, tracking: TrackingConfig, run: str, tune: TuneConfig | None = None) -> dict:
    """Train `run` ('<method>-<data>[-s<seed>]') at the learning rate the tune stage chose for its
    tune.learning_rates entry (`tune.key_of`: its own `<method>-<data>` one, else its method's;
    checked against `tune`; without `tune`, the method's); write <paths.train>/<run>/model and metrics.json."""
    method, data = parse_run(run)
    cfg = dataclasses.replace(cfg, common=dataclasses.replace(cfg.common, seed=run_seed(run, cfg.common.seed)))
    out = Path(paths.train) / run
    checkpoints = Path(paths.train) / ".checkpoints" / run
    data_file = training_file(paths, data)
    problems = read_problems(data_file)
    key = tune.key_of(run) if tune is not None else method
    learning_rate, source = read_learning_rate(paths, key, tune)  # after the training file: its error comes first
    config = {"train": {"common": to_dict(cfg.common), **_method_options(method, cfg)}, "run": run, "method": method, "data": data,
              "learning_rate": learning_rate, "learning_rate_source": source}
    # Under `accelerate launch` / torchrun (data parallel) every rank trains; rank 0 alone logs to
    # MLflow and writes the outputs, and the other ranks wait for it, then return.
    main = int(os.environ.get("RANK", "0")) == 0  # torchrun and accelerate set RANK in every process
    with stage_run("train", config, tracking if main else dataclasses.replace(tracking, enabled=False), run_name=f"train-{run}",
                   inputs=[paths.policy, data_file, rate_file(paths, key)]) as handle:
        handle.set_tags({"onpolicy.method": method, "onpolicy.data": data, "onpolicy.seed": str(cfg.common.seed)})
        model, tokenizer = load_materialised(paths.policy, dtype=TRAINING_DTYPE)
        summary: dict = {"run": run, "method": method, "data": data, "seed": cfg.common.seed, "learning_rate": learning_rate,
                         "learning_rate_source": source, "learning_rate_entry": key}
        rows = training_rows(method, cfg, model, tokenizer, Path(paths.policy), problems, summary)
        trainer = make_trainer(method, cfg, learning_rate, model, tokenizer, rows, checkpoints, tracking)
        ranks = PartialState()  # as the trainer's arguments configured it
        fingerprint = {"config": config, "data_sha256": file_sha256(data_file), "base_model": model_identity(paths.policy)}
        with ranks.main_process_first():  # one rank claims (or discards) the checkpoint folder
            resume = _last_checkpoint(checkpoints, fingerprint)
        if resume:
            log.info("resuming %s from %s", run, resume)
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=resume)
        # Data parallel: each rank's copy of the weights must be the same after the last step.
        checksum = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
        checksums = gather_object([checksum]) if ranks.num_processes > 1 else [checksum]
        if ranks.num_processes > 1:
            summary["data_parallel"] = {"processes": ranks.num_processes, "backend": str(ranks.backend),
                                        "weight_checksums": checksums, "ranks_agree": len(set(checksums)) == 1}
        if not main:
            ranks.wait_for_everyone()
            return summary
        history = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        # HF's training_loss averages only the steps of this process; after a resume, the mean over
        # the whole logged history (restored from the checkpoint) is the run's loss.
        train_loss = sum(history) / len(history) if history and resume else result.training_loss
        summary.update(steps=trainer.state.global_step, train_loss=train_loss, loss_history=history)
        record = {"resumed_from": resume, "seconds": round(time.perf_counter() - start, 1), "mlflow_run_id": handle.run_id}
        trained = trained_model(trainer, cfg.common)
        with atomic_dir(out / "model") as tmp:
            trained.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "onpolicy_train.json", config)
            write_json(tmp / PROVENANCE_FILE, {"kind": "trained", "run": run, "weights_sha256": weights_sha256(tmp)})
        write_json(out / "summary.json", summary)
        publish(handle, out / "metrics.json", {"train_loss": train_loss, "steps": trainer.state.global_step}, [out / "summary.json"],
                logged={"final_train_loss": train_loss, "steps": trainer.state.global_step})  # train_loss: HF's own, per step
        write_run_record(out, record)
        ranges = {"phi": (-3 * cfg.idft.beta, 3 * cfg.idft.beta), "gamma": (cfg.idft.gamma_min, cfg.idft.gamma_max)}
        if plot_diagnostics(trainer.state.log_history, out / "diagnostics.png", f"{run}: loss and IDFT diagnostics", ranges):
            handle.log_artifact(out / "diagnostics.png")
        if cfg.common.log_model:
            handle.log_artifacts(out / "model", artifact_path="model")
        shutil.rmtree(checkpoints, ignore_errors=True)
        log.info("train %s: %d steps, loss %.4f -> %s", run, trainer.state.global_step, result.training_loss, out / "model")
    ranks.wait_for_everyone()
    return summary | record
