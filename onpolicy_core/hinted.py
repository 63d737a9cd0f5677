"""Hinted Decoding (paper Sec. 4): rewrite a reference solution in the model's own words.

Two views of one problem decode in lockstep and share every sampled token:

- the *hinted* stream sees the question and the reference solution (plus an analysis prefix);
- the *plain* stream sees the question alone, exactly as at test time.

At each step, with H the entropy of the hinted next-token distribution and V the vocabulary size,

    lambda = f(H / log V)                       (linear: clamp(beta * H / log V, 0, 1))
    log m  = (1 - lambda) * log p_hint + lambda * log p_plain

and one token sampled from m (temperature, top-p) is appended to both streams. Where the hinted
stream is confident it leads; where it hesitates the model's own plain distribution takes over.

Decisions where the official demo (`HintedDecoding/sampling/hinted_decoding.py`) is ambiguous or
wrong, each deliberate:

1. KV cache: the official `use_cache=True` path feeds the whole prefix together with the cache,
   shifting positions; its no-cache path is the correct semantics and this module reproduces it
   exactly with a cache (tests compare against a no-cache batch-1 reference).
2. Length: up to `max_new_tokens` tokens are returned (the official loop stops one short).
3. The first token comes from the hinted stream alone (lambda = 0) and *is* checked for EOS.
4. Mixing is vectorised per pair (the official broadcast is only right for batch 1).
5. Answer marker: detected on the joint decode of the generated ids (the official concatenates
   one-token decodes; identical for ASCII markers such as `\\boxed{`). The token that completes the
   marker still comes from the mixture; from the next step on only the plain stream decides.
6. Lambda modes: linear clamp(beta*h, 0, 1); sigmoid sigmoid(beta*(h - centre)); piecewise 0 below
   h1, 1 above h2, linear between. Only linear with beta = 0 is pure hinted generation
   ("self-distillation"); sigmoid with beta = 0 gives 0.5 and piecewise ignores beta, as officially.
7. Sampling: temperature first, then top-p (transformers' warpers, HF order). The official demo
   applies top-p to the untempered mixture; greedy decoding is identical either way.
8. Repetition guard: rolling. After every token the `window`-token run ending there is counted, and
   decoding stops as soon as one run has occurred `count` times. The official loop checks only every
   100 tokens (and skips the last window), so a loop shorter than 100 tokens, or one that starts
   after the last check, ran to the length limit; this one is caught at any length and position.

Pure tensor code: no files, no tracking.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from onpolicy_core.options import DecodeOptions, MixingOptions


@dataclass
class Decoded:
    """One realigned response."""

    token_ids: list[int]
    finish_reason: str
    """'eos', 'length' or 'repetition'."""
    lambdas: list[float] = field(default_factory=list)
    """lambda of every mixing step (not the hinted-only first token nor the plain-only tail)."""
    switched_at: int | None = None
    """Index of the token that completed the answer marker (None if it never appeared)."""

    @property
    def mean_lambda(self) -> float | None:
        return sum(self.lambdas) / len(self.lambdas) if self.lambdas else None


def mixing_lambda(h_norm: torch.Tensor, mixing: MixingOptions) -> torch.Tensor:
    """lambda from the hinted stream's normalised entropy h = H / log V (elementwise)."""
    if mixing.lambda_mode == "linear":
        return torch.clamp(mixing.beta * h_norm, 0.0, 1.0)
    if mixing.lambda_mode == "sigmoid":
        return torch.sigmoid(mixing.beta * (h_norm - mixing.sigmoid_center))
    lo, hi = mixing.piecewise_bounds
    return torch.clamp((h_norm - lo) / (hi - lo), 0.0, 1.0)


# Phases of a pair: the first token is hinted-only, then mixing, then plain-only after the marker.
FIRST, MIX, PLAIN = 0, 1, 2


def _weighted(weight: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """weight * logp with 0 * -inf = 0: a stream with weight 0 leaves its masked tokens alone."""
    return torch.where(weight == 0, torch.zeros_like(logp), weight * logp)


def mix_step(hint_logits: torch.Tensor, plain_logits: torch.Tensor, phase: torch.Tensor, mixing: MixingOptions):
    """Mixed log-probabilities [B, V] and the lambda used per pair [B] for one decoding step.

    -inf logits (a masked vocabulary, or a logits processor before this one) are allowed: they add
    nothing to the entropy, and a token that is -inf in a stream with non-zero weight stays -inf."""
    log_h = torch.log_softmax(hint_logits.float(), dim=-1)
    log_p = torch.log_softmax(plain_logits.float(), dim=-1)
    entropy = -torch.special.xlogy(log_h.exp(), log_h.exp()).sum(-1)
    lam = mixing_lambda(entropy / math.log(hint_logits.shape[-1]), mixing)
    lam = torch.where(phase == FIRST, torch.zeros_like(lam), torch.where(phase == PLAIN, torch.ones_like(lam), lam))
    return _weighted((1.0 - lam)[:, None], log_h) + _weighted(lam[:, None], log_p), lam


def sample(logprobs: torch.Tensor, opts: DecodeOptions, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row: argmax when greedy, else temperature then top-p, each row with its own
    generator so a pair's sample does not depend on what else shares the batch."""
    if opts.greedy:
        return logprobs.argmax(-1)
    scores = TemperatureLogitsWarper(opts.temperature)(None, logprobs)
    if opts.top_p < 1.0:
        scores = TopPLogitsWarper(opts.top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])


def repeats(tokens: Sequence[int], window: int, count: int) -> bool:
    """Does some `window`-token run occur at least `count` times in `tokens`?"""
    seen: Counter = Counter()
    for i in range(len(tokens) - window + 1):
        key = tuple(tokens[i : i + window])
        seen[key] += 1
        if seen[key] >= count:
            return True
    return False


class _PairState:
    """Bookkeeping of one pair, shared by the batched generator and the reference."""

    def __init__(self, opts: DecodeOptions, eos_ids: set[int], decode, generator: torch.Generator | None):
        self.opts, self.eos_ids, self.decode, self.generator = opts, eos_ids, decode, generator
        self.tokens: list[int] = []
        self.lambdas: list[float] = []
        self.phase = FIRST
        self.switched_at: int | None = None
        self.finish: str | None = None
        self._runs: Counter = Counter()  # occurrences of each `repetition_window`-token run so far

    def push(self, token: int, lam: float) -> None:
        if self.phase == MIX:
            self.lambdas.append(lam)
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish = "eos"
            return
        marker = self.opts.answer_marker
        if self.phase != PLAIN and marker and marker in self.decode(self.tokens[-(len(marker) + 16):]):
            self.phase, self.switched_at = PLAIN, len(self.tokens) - 1
        elif self.phase == FIRST:
            self.phase = MIX
        o = self.opts
        if len(self.tokens) >= o.repetition_window:
            run = tuple(self.tokens[-o.repetition_window:])
            self._runs[run] += 1
            if self._runs[run] >= o.repetition_count:
                self.finish = "repetition"
                return
        if len(self.tokens) >= o.max_new_tokens:
            self.finish = "length"

    def result(self) -> Decoded:
        tokens = self.tokens[:-1] if self.finish == "eos" else self.tokens
        return Decoded(tokens, self.finish or "length", self.lambdas, self.switched_at)


def _generators(seeds: Sequence[int] | None, n: int, opts: DecodeOptions, device: torch.device | str = "cpu") -> list[torch.Generator | None]:
    """One generator per pair on the model's device (torch.multinomial needs the generator where the
    probabilities are); a seed gives the same samples on the same kind of device."""
    if opts.greedy:
        return [None] * n
    if seeds is None or len(seeds) != n:
        raise ValueError("sampling needs one seed per pair")
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows, left-padded to one width: new tokens append on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


@dataclass
class _Logits:
    logits: torch.Tensor


# --- Decoding kernels -------------------------------------------------------------------------------
# Two costs grow with batch x cache length at every decode step of a left-padded batch, and on CPU
# they, not the matmuls, made batch 32 slower per token than batch 16:
# 1. transformers' DynamicLayer appends a step by `torch.cat`, copying every row's whole past;
# 2. with a padding mask, transformers' SDPA path repeats grouped K/V heads (`repeat_kv`, 3x the
#    cache for SmolLM2) because CUDA's masked SDPA lacks GQA.
# `_GrowingLayer` writes each step into spare capacity (amortised growth), and the decode-step
# attention below reads the grouped K/V heads in place. Both are written here because neither
# transformers nor torch offers them for a masked, left-padded CPU batch.

GROUPED_DECODE = "onpolicy_grouped_decode"


def _grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs):
    """Attention of one new token per row against grouped K/V heads without repeating them:
    query [B, H, 1, D] is viewed as [B, Hkv, H/Hkv, D]. Other shapes go to transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    groups = key.shape[1]
    if q_len != 1 or groups == heads or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    q = query.reshape(batch, groups, heads // groups, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)) * scale  # [B, Hkv, H/Hkv, L]
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, : key.shape[-2]]  # [B, 1, 1, L]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [B, Hkv, H/Hkv, D]
    return out.reshape(batch, 1, heads, dim), None


def _register_grouped_decode() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(GROUPED_DECODE, _grouped_decode_attention)
    AttentionMaskInterface.register(GROUPED_DECODE, sdpa_mask)


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in a buffer with spare capacity: a step is
    written in place, and the buffer grows by `room` positions when full. `keys`/`values` are views."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.length, self.room = keys.shape[-2], room
        self._k, self._v = self._with_room(keys), self._with_room(values)
        self._views()

    def _with_room(self, t: torch.Tensor) -> torch.Tensor:
        shape = list(t.shape)
        shape[-2] = self.length + self.room
        buf = t.new_empty(shape)
        buf[..., : t.shape[-2], :] = t
        return buf

    def _views(self) -> None:
        self.keys, self.values = self._k[..., : self.length, :], self._v[..., : self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.length + n > self._k.shape[-2]:
            self._k, self._v = self._with_room(self.keys), self._with_room(self.values)
        self._k[..., self.length : self.length + n, :] = key_states
        self._v[..., self.length : self.length + n, :] = value_states
        self.length += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        self.length -= abs(tokens_to_remove)
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._k, self._v = self._k.repeat_interleave(repeats, dim=0), self._v.repeat_interleave(repeats, dim=0)
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()


def _growing(cache: DynamicCache, room: int) -> DynamicCache:
    """`cache` with every layer moved into a `_GrowingLayer` with `room` free positions (then grown by
    as many at a time); the source tensors are released layer by layer."""
    for index, layer in enumerate(cache.layers):
        cache.layers[index] = _GrowingLayer(layer.keys, layer.values, room)
        layer.keys = layer.values = None
    return cache


def _prefill(model, prompts: Sequence[Sequence[int]], pad_token_id: int, device):
    """Forward left-padded prompts into a fresh cache: (last logits, cache, mask, last positions)."""
    input_ids, attention = left_pad(prompts, pad_token_id, device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :], cache, attention, positions[:, -1:]


def _interleave_caches(model, hint_cache, plain_cache, hint_mask, plain_mask):
    """One cache with rows (hint 0, plain 0, hint 1, plain 1, ...): each side's keys/values are
    left-padded to the common length (masked out), so no position changes."""
    width = max(hint_mask.shape[1], plain_mask.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    def pair(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
        a, b = pad(a, dim), pad(b, dim)
        return torch.stack([a, b], dim=1).reshape(a.shape[0] * 2, *a.shape[1:])

    merged = DynamicCache(config=model.config)
    for index, (h, p) in enumerate(zip(hint_cache.layers, plain_cache.layers)):
        merged.update(pair(h.keys, p.keys, 2), pair(h.values, p.values, 2), index)
        h.keys = h.values = p.keys = p.values = None  # free each source layer as soon as it is merged
    return merged, pair(hint_mask, plain_mask, 1)


@torch.no_grad()
def hinted_generate(
    model,
    hinted_prompts: Sequence[Sequence[int]],
    plain_prompts: Sequence[Sequence[int]],
    opts: DecodeOptions,
    mixing: MixingOptions,
    eos_ids: Sequence[int],
    decode,
    pad_token_id: int = 0,
    seeds: Sequence[int] | None = None,
) -> list[Decoded]:
    """Batched Hinted Decoding with one model: pair i is rows 2i (hinted) and 2i+1 (plain) of one
    left-padded batch with a shared KV cache; finished pairs leave the batch."""
    if len(hinted_prompts) != len(plain_prompts):
        raise ValueError("hinted_prompts and plain_prompts differ in length")
    n = len(hinted_prompts)
    device = next(model.parameters()).device
    states = [_PairState(opts, set(eos_ids), decode, g) for g in _generators(seeds, n, opts, device)]
    # Prefill each stream on its own (hinted prompts are much longer than plain ones, so one
    # shared padding width would waste most of the work), then interleave the two caches.
    hint_logits, hint_cache, hint_mask, hint_pos = _prefill(model, hinted_prompts, pad_token_id, device)
    plain_logits, plain_cache, plain_mask, plain_pos = _prefill(model, plain_prompts, pad_token_id, device)
    cache, attention = _interleave_caches(model, hint_cache, plain_cache, hint_mask, plain_mask)
    del hint_cache, plain_cache
    # Room for the whole decode up to 256 tokens, so short decodes never regrow (the capacity a
    # longer one adds is at most 256 positions ahead of use).
    cache = _growing(cache, room=min(opts.max_new_tokens, 256))
    positions = torch.stack([hint_pos, plain_pos], dim=1).reshape(2 * n, 1)
    out = _Logits(torch.stack([hint_logits, plain_logits], dim=1).reshape(2 * n, 1, -1))
    active = list(range(n))  # pair index of each live pair, in batch order
    while active:
        logits = out.logits[:, -1, :]
        phase = torch.tensor([states[i].phase for i in active], device=logits.device)
        logprobs, lam = mix_step(logits[0::2], logits[1::2], phase, mixing)
        tokens = sample(logprobs, opts, [states[i].generator for i in active])
        for j, i in enumerate(active):
            states[i].push(int(tokens[j]), float(lam[j]))
        keep = [j for j, i in enumerate(active) if states[i].finish is None]
        if not keep:
            break
        if len(keep) < len(active):
            rows_kept = torch.tensor([r for j in keep for r in (2 * j, 2 * j + 1)], device=device)
            cache.batch_select_indices(rows_kept)
            attention, positions, tokens = attention[rows_kept], positions[rows_kept], tokens[torch.tensor(keep, device=tokens.device)]
            active = [active[j] for j in keep]
        step_ids = tokens.repeat_interleave(2)[:, None].to(device)
        attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)
        positions = positions + 1
        with _attention(model, GROUPED_DECODE):
            out = model(input_ids=step_ids, attention_mask=attention, position_ids=positions,
                        past_key_values=cache, use_cache=True)
    return [s.result() for s in states]


@contextlib.contextmanager
def _attention(model, name: str):
    """Run `model` with the attention function registered as `name`, then restore its own."""
    config = model.config
    own = config._attn_implementation
    if own != "sdpa":  # eager, flash-attention, ...: the user's choice stays
        yield
        return
    if name not in _REGISTERED:
        _register_grouped_decode()
        _REGISTERED.add(name)
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = own


_REGISTERED: set[str] = set()


@torch.no_grad()
def reference_generate(
    hint_model,
    plain_model,
    hinted_prompt: Sequence[int],
    plain_prompt: Sequence[int],
    opts: DecodeOptions,
    mixing: MixingOptions,
    eos_ids: Sequence[int],
    decode,
    seed: int | None = None,
    use_cache: bool = False,
) -> Decoded:
    """The straightforward batch-1 method with the official control flow: two model handles (may be
    two copies), by default no KV cache (the whole prefix recomputed every step), and after the
    answer marker only the plain stream runs. The ground truth for tests and the bench baseline."""
    device = next(hint_model.parameters()).device
    state = _PairState(opts, set(eos_ids), decode, _generators(None if seed is None else [seed], 1, opts, device)[0])
    hint_ids, plain_ids = list(hinted_prompt), list(plain_prompt)
    caches = [None, None]
    while state.finish is None:
        logits = []
        streams = ((hint_model, hint_ids), (plain_model, plain_ids))
        for k, (model, ids) in enumerate(streams):
            if k == 0 and state.phase == PLAIN:
                continue  # lambda is 1 from here on: the hinted stream is not needed
            if use_cache:
                if caches[k] is None:
                    caches[k] = DynamicCache(config=model.config)
                    feed = ids
                else:
                    feed = ids[-1:]
                out = model(input_ids=torch.tensor([feed], device=device), past_key_values=caches[k], use_cache=True)
            else:
                out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            logits.append(out.logits[:, -1, :])
        logprobs, lam = mix_step(logits[0], logits[-1], torch.tensor([state.phase]), mixing)
        token = int(sample(logprobs, opts, [state.generator])[0])
        state.push(token, float(lam[0]))
        hint_ids.append(token)
        plain_ids.append(token)
    return state.result()
