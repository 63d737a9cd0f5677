"""Stage `eval`: score one model (the base model or a trained run) on the configured benchmarks.

Per benchmark: greedy accuracy, Avg@k and unbiased pass@k over k samples (lenient, Qwen-style: the
last \\boxed{}, else the last number), the same accuracies strictly (only a \\boxed{} answer counts),
mean response length,
the share of responses with no extractable answer and the share cut off at max_new_tokens. Every
response is kept in `records.parquet` for inspection. The MLflow run is nested under the model's
training run, and the headline numbers are also logged on the training run itself, so a model and
its scores sit together in the UI. Work units (eval.work_unit problems of one benchmark) are
checkpointed: a killed run resumes, and shard workers split the units between them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from onpolicy_core.algorithms.evaluation import avg_at_k, mean_pass_at_k, pass_ks
from onpolicy_core.algorithms.grading import grade, grade_boxed
from onpolicy_core.algorithms.prompts import render_prompt
from onpolicy_core.data.benchmarks import BenchmarkSource, Generator, load_benchmark
from onpolicy_core.data.io import InputError, write_json, write_parquet
from onpolicy_core.decoding.generation import (
    Completion,
    HFGenerator,
    SamplingSpec,
    VLLMGenerator,
)
from onpolicy_core.plumbing.config import (
    BASE,
    DataConfig,
    EvalConfig,
    ModelConfig,
    PathsConfig,
    TrackingConfig,
    output_settings,
    parse_run,
    run_group,
    run_seed,
    to_dict,
)
from onpolicy_core.plumbing.tracking import log_metrics_to, register_model
from onpolicy_core.stages.skeleton import (
    ModelStage,
    Shard,
    map_units,
    model_stage,
    publish,
    read_run_record,
    run_units,
    write_run_record,
)

log = logging.getLogger(__name__)



def model_folder(paths: PathsConfig, name: str) -> Path:
    """'base' is the starting policy (paths.policy: primed, or the materialised model); anything else
    is a training run's saved model."""
    if name == BASE:
        return Path(paths.policy)
    parse_run(name)
    return Path(paths.train) / name / "model"


def training_run_id(paths: PathsConfig, name: str) -> str | None:
    """The MLflow run id the train stage recorded for `name` (None for the base model)."""
    return None if name == BASE else read_run_record(Path(paths.train) / name).get("mlflow_run_id")


def model_tags(name: str) -> dict[str, str]:
    """Tags every eval run carries, base model included, so the MLflow runs table can put all models
    side by side (`tags.onpolicy.stage = 'eval'`): each logs the same `<benchmark>/<metric>` keys."""
    if name == BASE:
        return {"onpolicy.model": BASE, "onpolicy.method": BASE, "onpolicy.data": "-", "onpolicy.seed": "-"}
    method, data = parse_run(name)
    seed = run_seed(name, -1)  # -1: no -s<seed> suffix, so train.common.seed
    return {"onpolicy.model": name, "onpolicy.method": method, "onpolicy.data": data, "onpolicy.group": run_group(name),
            "onpolicy.seed": str(seed) if seed >= 0 else "train.common.seed"}


def make_generator(cfg: EvalConfig, folder: Path, model_cfg: ModelConfig, stage: ModelStage):
    """The generator of `cfg.backend` (the HF one over the stage's loaded model)."""
    if cfg.backend == "vllm":
        return VLLMGenerator(str(folder), stage.tokenizer, cfg.vllm, dtype=model_cfg.dtype, seed=cfg.seed)
    return HFGenerator(stage.model, stage.tokenizer, batch_size=cfg.batch_size)


def benchmark_source(cfg: EvalConfig, paths: PathsConfig) -> BenchmarkSource:
    return BenchmarkSource(data_root=cfg.data_root, allow_hub=cfg.allow_hub, limit=cfg.limit, limit_order=cfg.limit_order, seed=cfg.seed,
                           held_out=Path(paths.data) / "eval.jsonl", ood_extra_steps=cfg.ood_extra_steps,
                           ood_operand_scale=cfg.ood_operand_scale, custom=cfg.custom_benchmarks)


def _rows(benchmark: str, problems, mode: str, completions: list[list[Completion]]) -> list[dict]:
    rows = []
    for problem, samples in zip(problems, completions):
        for index, c in enumerate(samples):
            g, strict = grade(c.text, problem.answer), grade_boxed(c.text, problem.answer)
            rows.append({
                "benchmark": benchmark, "problem_id": problem.id, "mode": mode, "sample": index, "gold": problem.answer,
                "response": c.text, "boxed": strict.extracted, "extracted": g.extracted, "correct": g.correct,
                "strict_correct": strict.correct,
                "n_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason,
            })
    return rows


def evaluate_benchmark(generator, tokenizer, benchmark: str, problems, cfg: EvalConfig) -> list[dict]:
    """Greedy and sampled responses to every problem, graded; one row per response."""
    prompts = [tokenizer(render_prompt(tokenizer, p.question), add_special_tokens=False)["input_ids"] for p in problems]
    rows: list[dict] = []
    passes = ([("greedy", SamplingSpec(1, 0.0, 1.0, cfg.max_new_tokens, cfg.seed))] if cfg.greedy else []) + (
        [("sample", SamplingSpec(cfg.samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed))] if cfg.samples else [])
    for mode, spec in passes:
        with tqdm(total=len(prompts), desc=f"{benchmark} ({mode}{'' if mode == 'greedy' else f' x{spec.n}'})", unit="problem",
                  dynamic_ncols=True) as bar:
            rows.extend(_rows(benchmark, problems, mode, generator.generate(prompts, spec, progress=bar)))
    return rows


def benchmark_metrics(rows: list[dict], samples: int) -> dict:
    """The numbers reported per benchmark (keys are valid MLflow metric names)."""
    greedy = [r for r in rows if r["mode"] == "greedy"]
    sampled: dict[str, list[bool]] = {}
    strict_sampled: dict[str, list[bool]] = {}
    for r in rows:
        if r["mode"] == "sample":
            sampled.setdefault(r["problem_id"], []).append(bool(r["correct"]))
            strict_sampled.setdefault(r["problem_id"], []).append(bool(r["strict_correct"]))
    out: dict[str, float] = {"problems": len({r["problem_id"] for r in rows})}
    if greedy:
        out["greedy_accuracy"] = sum(r["correct"] for r in greedy) / len(greedy)
        out["strict_greedy_accuracy"] = sum(r["strict_correct"] for r in greedy) / len(greedy)
    if sampled:
        matrix = list(sampled.values())
        out["avg_at_k"] = avg_at_k(matrix)
        out["strict_avg_at_k"] = avg_at_k(list(strict_sampled.values()))
        for k in pass_ks(samples):
            out[f"pass_at_{k}"] = mean_pass_at_k(matrix, k)
    out["mean_response_tokens"] = sum(r["n_tokens"] for r in rows) / len(rows)
    # math-verify falls back to the last number of a response; the prompt asks for \boxed{}, so a
    # response without one has not given a final answer in the requested form.
    out["no_answer_rate"] = sum(r["boxed"] is None for r in rows) / len(rows)
    out["truncated_rate"] = sum(r["finish_reason"] == "length" for r in rows) / len(rows)
    return out


HEADLINE = ("greedy_accuracy", "strict_greedy_accuracy", "avg_at_k")
"""What the DVC metrics file keeps per benchmark (`dvc metrics show` / `dvc exp show` stay readable);
every number is in summary.json and MLflow."""


def headline_metrics(metrics: dict[str, dict]) -> dict[str, dict]:
    return {b: {k: m[k] for k in HEADLINE if k in m} for b, m in metrics.items()}


def run_eval(cfg: EvalConfig, paths: PathsConfig, tracking: TrackingConfig, model_cfg: ModelConfig, data_cfg: DataConfig,
             name: str = BASE, shard: Shard | None = None, merge: bool = False) -> dict | None:
    """Evaluate model `name` ('base' or '<method>-<data>'); write <paths.eval>/<name>/{records.parquet,
    metrics.json, summary.json} and return the metrics per benchmark. `shard`: only that shard's work
    units, no outputs (returns None); `merge`: the outputs from every shard's units."""
    folder = model_folder(paths, name)
    if not (folder / "config.json").is_file():
        hint = "run `onpolicy model`" if name == BASE else f"run `dvc repro train@{name}` (or `onpolicy train --run {name}`)"
        raise InputError(f"{folder}: no model for {name!r}; {hint}")
    out = Path(paths.eval) / name
    config = {"eval": to_dict(cfg), "model": name, "model_folder": str(folder)}
    parent = training_run_id(paths, name)
    where = benchmark_source(cfg, paths)
    arith = data_cfg.arithmetic
    generator_settings = Generator(min_steps=arith.min_steps, max_steps=arith.max_steps, max_operand=arith.max_operand)
    loaded = {b: load_benchmark(b, where, generator_settings) for b in cfg.benchmarks}
    fingerprint = {"config": output_settings(cfg), "problems": {b: [p.id for p in problems] for b, (problems, _) in loaded.items()}}
    # A work unit is (benchmark, first problem): eval.work_unit problems of one benchmark.
    units = [(b, start) for b, (problems, _) in loaded.items() for start in range(0, len(problems), cfg.work_unit)]
    with model_stage("eval", config, tracking, out=out, model_dir=folder, fingerprint=fingerprint, run_name=f"eval-{name}",
                     parent_run_id=parent, inputs=[folder, where.held_out], load_model=cfg.backend == "hf",
                     dtype=model_cfg.dtype, shard=shard, merge=merge) as stage:
        if stage.run is not None:
            stage.run.set_tags(model_tags(name) | {"onpolicy.backend": cfg.backend, "onpolicy.benchmarks": ",".join(cfg.benchmarks)})

        def evaluate_units(mine: range) -> list[dict]:
            generator = make_generator(cfg, folder, model_cfg, stage)

            def evaluate_unit(unit: list[tuple[str, int]]) -> list[dict]:
                ((benchmark, first),) = unit
                return evaluate_benchmark(generator, stage.tokenizer, benchmark, loaded[benchmark][0][first : first + cfg.work_unit], cfg)

            try:
                return map_units(stage.shards, units, 1, evaluate_unit, units=mine)
            finally:
                generator.close()

        done = run_units(stage, out, len(units), evaluate_units, shard=shard, merge=merge)
        if done is None:
            return None
        rows, timing = done.rows, done.timing()
        generated = sum(r["n_tokens"] for r in rows)
        metrics = {b: benchmark_metrics([r for r in rows if r["benchmark"] == b], cfg.samples) for b in cfg.benchmarks}
        skipped = {b: dict(report.skipped) for b, (_, report) in loaded.items() if report is not None and report.skipped}
        summary = {"model": name, "backend": cfg.backend, "benchmarks": metrics, "skipped": skipped, "generated_tokens": generated}
        record = done.record(stage.run, mlflow_parent_run_id=parent)
        flat = {f"{b}/{k}": v for b, m in metrics.items() for k, v in m.items()}
        if parent:
            log_metrics_to(parent, {f"eval/{k}": v for k, v in flat.items()}, tracking)
            if tracking.registry:
                tags = {f"eval.{k.replace('/', '.')}": round(v, 6) for k, v in flat.items()}
                record["registered_version"] = register_model(parent, f"{tracking.experiment}-{name}", tags, tracking)
        write_parquet(out / "records.parquet", rows)
        write_json(out / "summary.json", summary)
        publish(stage.run, out / "metrics.json", headline_metrics(metrics), [out / "summary.json", out / "records.parquet"],
                logged=flat | timing)
        write_run_record(out, record)
        log.info("eval %s: %s -> %s", name, {b: round(m.get("greedy_accuracy", m.get("avg_at_k", 0.0)), 3) for b, m in metrics.items()}, out)
    return metrics
