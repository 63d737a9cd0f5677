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
   marker still comes from the mixture; from the next step on only the plain stream decides. The
   official demo keeps it so to the end (`marker_scope: rest`). A policy that boxes intermediate
   values ("the initial number is $\\boxed{15}$") then loses the hint after its first step, so the
   default (`marker_scope: box`) hands the decision back to the mixture once the marker's brace
   closes, and re-arms at the next box: every boxed value is the plain stream's own, the reasoning
   between boxes keeps its hint (docs/paper_map.md).
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
import functools
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

from onpolicy_core.algorithms.options import DecodeOptions, MixingOptions


@dataclass
class Decoded:
    """One realigned response."""

    token_ids: list[int]
    finish_reason: str
    """'eos', 'length' or 'repetition'."""
    lambdas: list[float] = field(default_factory=list)
    """lambda of every mixing step (not the hinted-only first token nor the plain-only tail)."""
    switched_at: int | None = None
    """Index of the token that completed the last answer marker (None if it never appeared)."""
    switches: int = 0
    """How many times the answer marker handed the decision to the plain stream."""

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


class PairState:
    """Bookkeeping of one pair, shared by the batched generator and the reference."""

    def __init__(self, opts: DecodeOptions, eos_ids: set[int], decode, generator: torch.Generator | None):
        self.opts, self.eos_ids, self.decode, self.generator = opts, eos_ids, decode, generator
        self.tokens: list[int] = []
        self.lambdas: list[float] = []
        self.phase = FIRST
        self.switched_at: int | None = None
        self.finish: str | None = None
        self.switches = 0
        self._runs: Counter = Counter()  # occurrences of each `repetition_window`-token run so far
        self._search_from = 0  # a marker is looked for in tokens from here on (after the last closed box)
        self._marker_window = 0  # where the tokens holding the current marker begin

    def _tail(self, marker: str) -> int:
        return max(self._search_from, len(self.tokens) - (len(marker) + 16))

    def _box_closed(self, marker: str) -> bool:
        """Has the brace the marker opened been closed by the tokens since?"""
        text = self.decode(self.tokens[self._marker_window:])
        depth = 1
        for ch in text[text.find(marker) + len(marker):]:
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return True
        return False

    def push(self, token: int, lam: float) -> None:
        if self.phase == MIX:
            self.lambdas.append(lam)
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish = "eos"
            return
        marker = self.opts.answer_marker
        if self.phase != PLAIN and marker and marker in self.decode(self.tokens[self._tail(marker):]):
            self._marker_window = self._tail(marker)
            self.phase, self.switched_at = PLAIN, len(self.tokens) - 1
            self.switches += 1
        elif self.phase == PLAIN and self.opts.marker_scope == "box" and self._box_closed(marker):
            self.phase, self._search_from = MIX, len(self.tokens)
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
        return Decoded(tokens, self.finish or "length", self.lambdas, self.switched_at, self.switches)


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


# --- Decoding kernels -------------------------------------------------------------------------------
# Two costs grow with batch x cache length at every decode step of a left-padded batch, and on CPU
# they, not the matmuls, made batch 32 slower per token than batch 16:
# 1. transformers' DynamicLayer appends a step by `torch.cat`, copying every row's whole past;
# 2. with a padding mask, transformers' SDPA path repeats grouped K/V heads (`repeat_kv`, 3x the
#    cache for SmolLM2) because CUDA's masked SDPA lacks GQA.
# `_GrowingLayer` writes each step into spare capacity (amortised growth), and the decode-step
# attention below reads the grouped K/V heads in place. Both are written here because neither
# transformers nor torch offers them for a masked, left-padded CPU batch.
# Prefill was the other half of the time: a left-padded batch of prompts spends work on padding and
# needs a mask (no causal fast path). On CPU `_prefill` runs each prompt alone and copies its keys
# and values straight into the decode buffers (faster prefill, the prompt cache held once;
# measured in docs/performance.md).

GROUPED_DECODE = "onpolicy_grouped_decode"
DECODE_ROOM = 256  # KV positions a cache buffer grows by


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


@functools.cache
def _register_grouped_decode() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(GROUPED_DECODE, _grouped_decode_attention)
    AttentionMaskInterface.register(GROUPED_DECODE, sdpa_mask)


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in buffers with spare capacity: a step is written
    in place, and the buffers grow by `room` positions when full. `keys`/`values` are views of the
    first `length` positions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, room: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k, self._v, self.length, self.room = keys, values, length, room
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


def _prefill(model, rows: Sequence[Sequence[int]], room: int, pad_token_id: int, one_by_one: bool):
    """Run every prompt row into one left-padded cache of `_GrowingLayer`s with `room` free positions.

    one_by_one (CPU): each row runs alone, without padding or a mask (SDPA's causal fast path);
    otherwise (GPU, where a launch per layer per row costs more than the padding) the even rows
    (hinted) and the odd rows (plain) run as two left-padded batches. Each forward's keys and values
    are copied straight into the decode buffers and released, so the prompt cache is held once.
    Returns (last-position logits [rows, vocab], cache, attention mask [rows, width], last positions [rows, 1]).
    """
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    groups = [[i] for i in range(len(rows))] if one_by_one else [list(range(0, len(rows), 2)), list(range(1, len(rows), 2))]
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
    logits = None
    for group in groups:
        ids, mask = left_pad([rows[i] for i in group], pad_token_id, device)
        step_cache = DynamicCache(config=model.config)
        extra = {} if one_by_one else {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        out = model(input_ids=ids, past_key_values=step_cache, use_cache=True, logits_to_keep=1, **extra)
        if not buffers:  # zeros, not empty: padded positions are masked, but NaN * 0 is NaN
            buffers = [(layer.keys.new_zeros(len(rows), layer.keys.shape[1], width + room, layer.keys.shape[3]),
                        layer.values.new_zeros(len(rows), layer.values.shape[1], width + room, layer.values.shape[3]))
                       for layer in step_cache.layers]
            logits = out.logits.new_empty(len(rows), out.logits.shape[-1])
        index, span = torch.tensor(group, device=device), slice(width - ids.shape[1], width)
        for (keys, values), layer in zip(buffers, step_cache.layers):
            keys[index, :, span] = layer.keys
            values[index, :, span] = layer.values
            layer.keys = layer.values = None
        logits[index] = out.logits[:, -1, :]
    cache = DynamicCache(config=model.config)
    cache.layers = [_GrowingLayer(keys, values, width, room) for keys, values in buffers]
    lengths = torch.tensor([len(r) for r in rows], device=device)
    attention = (torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]).long()
    return logits, cache, attention, (lengths - 1)[:, None]


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
    prefill_rows: bool | None = None,
) -> list[Decoded]:
    """Batched Hinted Decoding with one model: pair i is rows 2i (hinted) and 2i+1 (plain) of one
    left-padded batch with a shared KV cache; finished pairs leave the batch. `prefill_rows`: run
    each prompt alone at prefill (default on CPU, measured faster there) or as padded batches."""
    if len(hinted_prompts) != len(plain_prompts):
        raise ValueError("hinted_prompts and plain_prompts differ in length")
    n = len(hinted_prompts)
    if n == 0:
        return []
    device = next(model.parameters()).device
    states = [PairState(opts, set(eos_ids), decode, g) for g in _generators(seeds, n, opts, device)]
    rows = [row for pair in zip(hinted_prompts, plain_prompts) for row in pair]
    # Room for the whole decode up to DECODE_ROOM tokens, so short decodes never regrow (the
    # capacity a longer one adds is at most DECODE_ROOM positions ahead of use).
    one_by_one = device.type == "cpu" if prefill_rows is None else prefill_rows
    logits, cache, attention, positions = _prefill(model, rows, room=min(opts.max_new_tokens, DECODE_ROOM),
                                                   pad_token_id=pad_token_id, one_by_one=one_by_one)
    active = list(range(n))  # pair index of each live pair, in batch order
    with _grouped_decode(model):  # every forward below is a one-token decode step
        while True:
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
                attention, positions = attention[rows_kept], positions[rows_kept]
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
                active = [active[j] for j in keep]
            step_ids = tokens.repeat_interleave(2)[:, None].to(device)
            attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=1)
            positions = positions + 1
            logits = model(input_ids=step_ids, attention_mask=attention, position_ids=positions,
                           past_key_values=cache, use_cache=True).logits[:, -1, :]
    return [s.result() for s in states]


@contextlib.contextmanager
def _grouped_decode(model):
    """Run an SDPA `model` with `_grouped_decode_attention`, then restore its own attention
    (eager, flash-attention, ...: the user's choice stays)."""
    config = model.config
    own = config._attn_implementation
    if own != "sdpa":
        yield
        return
    _register_grouped_decode()
    config._attn_implementation = GROUPED_DECODE
    try:
        yield
    finally:
        config._attn_implementation = own


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
    answer marker only the plain stream runs (until the box closes, under marker_scope 'box'). The
    ground truth for tests and the bench baseline."""
    device = next(hint_model.parameters()).device
    state = PairState(opts, set(eos_ids), decode, _generators(None if seed is None else [seed], 1, opts, device)[0])
    hint_ids, plain_ids = list(hinted_prompt), list(plain_prompt)
    caches, fed = [None, None], [0, 0]  # each stream's cache and how many of its ids it holds
    while state.finish is None:
        logits = []
        streams = ((hint_model, hint_ids), (plain_model, plain_ids))
        for k, (model, ids) in enumerate(streams):
            if k == 0 and state.phase == PLAIN:
                continue  # lambda is 1 here: the hinted stream is not needed
            if use_cache:
                if caches[k] is None:
                    caches[k] = DynamicCache(config=model.config)
                feed, fed[k] = ids[fed[k]:], len(ids)  # after a skipped stretch: every id it missed
                out = model(input_ids=torch.tensor([feed], device=device), past_key_values=caches[k], use_cache=True)
            else:
                out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            logits.append(out.logits[:, -1, :])
        logprobs, lam = mix_step(logits[0], logits[-1], torch.tensor([state.phase], device=device), mixing)
        token = int(sample(logprobs, opts, [state.generator])[0])
        state.push(token, float(lam[0]))
        hint_ids.append(token)
        plain_ids.append(token)
    return state.result()
