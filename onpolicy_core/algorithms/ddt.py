"""Distribution Discriminant Theory scoring (paper Sec. 3, Eq. for the centred log-likelihood).

phi_t = log p_tau(x_t | x_<t) + H_tau(p_t)

p_tau is the model's next-token distribution at temperature tau and H_tau its entropy. For tokens
sampled from p_tau itself E[phi_t | context] = 0, so the mean phi of a response measures how far it
sits from the model's own distribution (strongly negative: text the model would not write).

Pure tensor code: no files, no tracking. The batched scorer runs a shared prompt prefix once, then
the backbone over each row at its own length (no padding; or one padded forward, for GPUs), keeps
only the hidden states that predict response tokens (the LM head never sees prompt positions), and
projects them through the LM head in chunks of positions, so the vocabulary-sized temporaries are
`chunk_size x vocab`, independent of batch size and length. The log-softmax/entropy math of each
chunk is TRL's `selective_log_softmax_and_entropy` (a fused Triton kernel on GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from trl.trainer.utils import selective_log_softmax_and_entropy

from onpolicy_core.algorithms.options import ScoreLayout as Layout
from onpolicy_core.algorithms.options import ScorePrecision as Precision

MIN_SHARED_PREFIX = 8
MIN_SHARED_FRACTION = 0.1  # unpadded layout: share a prefix of at least this share of the mean row


@dataclass
class TokenScores:
    """Per-token scores of one response (1-D float32 tensors of the response's length)."""

    logp: torch.Tensor
    entropy: torch.Tensor

    @property
    def phi(self) -> torch.Tensor:
        return self.logp + self.entropy


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


def lm_head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head projection with the output scaling some architectures apply in their forward."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def matmul_autocast(device: torch.device, precision: Precision):
    """bf16 autocast of the matmuls (CPUs with AVX512-BF16/AMX, GPUs); the softmax math stays fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def score_batch(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    temperature: float = 1.0,
    chunk_size: int = 256,
    pad_token_id: int = 0,
    layout: Layout = "unpadded",
    precision: Precision = "fp32",
) -> list[TokenScores]:
    """Teacher-forced log p, entropy (and so phi) of every response token, for a batch of pairs.

    layout "unpadded" (CPU default): each row runs through the backbone at its own length, with
    explicit position ids and no pad tokens, so attention takes the causal fast path and no work
    is spent on padding; the response positions of all rows then go through the LM head in chunks.
    Memory is one row's activations plus one chunk, whatever the batch size. The chat header
    shared by all prompts runs once when it is at least MIN_SHARED_FRACTION of the mean row: its
    cache needs an attention mask, which takes SDPA off the causal fast path, and that costs more
    than it saves on long rows (measured on this CPU: ~1,000-token answers 10% slower at batch 8
    with the header shared; ~120-token answers faster with it).
    layout "padded" (GPUs): a shared prompt prefix runs once, then one right-padded forward for the
    whole batch (with causal attention, padding after a sequence cannot change its own tokens' scores).

    Either way a pair scores the same alone or in any batch (up to float rounding), and a response
    of zero tokens gets empty tensors.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError("prompt_ids and response_ids differ in length")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (the first response token needs a context)")
    # The last response token predicts nothing, so it is not fed.
    inputs = [list(p) + list(r)[:-1] for p, r in zip(prompt_ids, response_ids)]
    # Prompts share the chat template's header (system prompt and all): its keys and values are
    # computed once and reused by every row. It stops one token short of the shortest prompt, whose
    # last position must be run to predict the first response token.
    shared = min(_common_prefix_length(prompt_ids), min(len(p) for p in prompt_ids) - 1)
    worth_it = layout == "padded" or shared >= MIN_SHARED_FRACTION * sum(map(len, inputs)) / len(inputs)
    shared = shared if shared >= MIN_SHARED_PREFIX and len(inputs) > 1 and worth_it else 0
    device = next(model.parameters()).device
    lengths = [len(r) for r in response_ids]
    out_logp = torch.zeros(sum(lengths), dtype=torch.float32)
    out_entropy = torch.zeros_like(out_logp)
    if not out_logp.numel():
        return [TokenScores(out_logp[:0], out_entropy[:0]) for _ in lengths]
    labels = torch.tensor([t for r in response_ids for t in r], dtype=torch.long, device=device)
    cache = None
    with matmul_autocast(device, precision):
        if shared:
            cache = DynamicCache(config=model.config)
            model.base_model(input_ids=torch.tensor([list(prompt_ids[0][:shared])], device=device),
                             past_key_values=cache, use_cache=True)
        if layout == "padded":
            hidden_rows = [_padded_backbone(model, inputs, prompt_ids, response_ids, shared, cache, pad_token_id, device)]
        else:
            hidden_rows = (_row_backbone(model, x, len(p), len(r), shared, cache, device)
                           for x, p, r in zip(inputs, prompt_ids, response_ids) if r)
        # The LM head and the vocabulary-sized softmax run over chunks of response positions,
        # gathered across rows, so a chunk is `chunk_size x vocab` whatever the row lengths.
        pending: list[torch.Tensor] = []
        waiting = done = 0
        for block in hidden_rows:
            pending.append(block)
            waiting += block.shape[0]
            while waiting >= chunk_size:
                joined = torch.cat(pending)
                done = _head_chunk(model, joined[:chunk_size], labels, done, temperature, out_logp, out_entropy)
                pending, waiting = [joined[chunk_size:]], waiting - chunk_size
        if waiting:
            done = _head_chunk(model, torch.cat(pending), labels, done, temperature, out_logp, out_entropy)
    return [TokenScores(lp, ent) for lp, ent in zip(out_logp.split(lengths), out_entropy.split(lengths))]


def _head_chunk(model, hidden: torch.Tensor, labels: torch.Tensor, done: int, temperature: float,
                out_logp: torch.Tensor, out_entropy: torch.Tensor) -> int:
    """log p and entropy of one chunk of response positions, written at `done`; returns the new offset."""
    n = hidden.shape[0]
    logits = lm_head_logits(model, hidden).float()
    logp, entropy = selective_log_softmax_and_entropy(
        logits, labels[done : done + n], entropy_requires_grad=False, temperature=temperature
    )
    out_logp[done : done + n] = logp.cpu()
    out_entropy[done : done + n] = entropy.cpu()
    return done + n


def _row_backbone(model, row: list[int], prompt_len: int, response_len: int, shared: int,
                  cache: DynamicCache | None, device: torch.device) -> torch.Tensor:
    """Hidden states of one row's response-predicting positions (position prompt_len-1+j predicts
    response token j), the row run alone after the shared prefix (the cache is cut back after);
    without a prefix, with no mask at all (SDPA's causal fast path)."""
    rest = torch.tensor([row[shared:]], device=device)
    kwargs: dict = {"use_cache": False}
    if cache is not None:
        positions = torch.arange(shared, len(row), device=device)[None]
        kwargs = {"past_key_values": cache, "use_cache": True, "position_ids": positions}
    hidden = model.base_model(input_ids=rest, **kwargs).last_hidden_state[0]
    if cache is not None:
        cache.crop(-rest.shape[1])  # back to the shared prefix
    start = prompt_len - 1 - shared
    return hidden[start : start + response_len]


def _padded_backbone(model, inputs, prompt_ids, response_ids, shared: int, cache: DynamicCache | None,
                     pad_token_id: int, device: torch.device) -> torch.Tensor:
    """Hidden states of every response-predicting position of a right-padded batch, in row order."""
    width = max(len(x) for x in inputs) - shared
    input_ids = torch.full((len(inputs), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(inputs), width), dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.bool)
    for row, (p, r, x) in enumerate(zip(prompt_ids, response_ids, inputs)):
        rest = x[shared:]
        input_ids[row, : len(rest)] = torch.tensor(rest, dtype=torch.long)
        attention[row, : len(rest)] = 1
        start = len(p) - 1 - shared
        mask[row, start : start + len(r)] = True
    kwargs: dict = {"use_cache": False}
    if cache is not None:
        cache.batch_repeat_interleave(len(inputs))
        attention = torch.cat([torch.ones((len(inputs), shared), dtype=torch.long), attention], dim=1)
        positions = torch.arange(shared, shared + width).expand(len(inputs), width)
        kwargs = {"past_key_values": cache, "use_cache": True, "position_ids": positions.to(device)}
    hidden = model.base_model(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs).last_hidden_state
    return hidden[mask.to(device)]


@torch.no_grad()
def reference_scores(
    model: torch.nn.Module, prompt_ids: Sequence[int], response_ids: Sequence[int], temperature: float = 1.0
) -> TokenScores:
    """The straightforward method (as the official `PhiCalculator`): one example, full logits and a
    full-vocabulary softmax at every position. Kept as the ground truth for tests and benchmarks."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    probs = logprobs.exp()
    entropy = -(probs * logprobs).sum(-1)
    start, n = len(prompt_ids) - 1, len(response_ids)
    positions = torch.arange(start, start + n, device=ids.device)
    target = torch.tensor(list(response_ids), dtype=torch.long, device=ids.device)
    return TokenScores(logprobs[positions, target].cpu(), entropy[positions].cpu())


def length_batches(lengths: Sequence[int], max_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Group example indices into batches of similar length (longest first), each within
    `max_tokens` padded tokens and `max_batch_size` rows. Sorting keeps padding waste small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1 > max_batch_size or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def score_pairs(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    temperature: float = 1.0,
    chunk_size: int = 256,
    max_tokens_per_batch: int = 4096,
    max_batch_size: int = 8,
    pad_token_id: int = 0,
    on_batch=None,
    layout: Layout = "unpadded",
    precision: Precision = "fp32",
) -> list[TokenScores]:
    """`score_batch` over any number of (prompt, response) pairs, batched by length; results in
    input order. `on_batch(n_examples, n_tokens)` is called after each batch (progress bars)."""
    out: list[TokenScores | None] = [None] * len(pairs)
    lengths = [len(p) + len(r) for p, r in pairs]
    for batch in length_batches(lengths, max_tokens_per_batch, max_batch_size):
        scores = score_batch(model, [pairs[i][0] for i in batch], [pairs[i][1] for i in batch],
                             temperature=temperature, chunk_size=chunk_size, pad_token_id=pad_token_id,
                             layout=layout, precision=precision)
        for i, s in zip(batch, scores):
            out[i] = s
        if on_batch is not None:
            on_batch(len(batch), sum(len(pairs[i][1]) for i in batch))
    return out  # type: ignore[return-value]


def example_stats(scores: TokenScores, thresholds: Sequence[float]) -> dict[str, float | int | None]:
    """Per-example summary: mean/sum phi, token count, share of tokens with phi > 0 and > each threshold.
    A response of zero tokens has n_tokens 0 and None for every mean and share."""
    phi = scores.phi
    n = int(phi.numel())
    stats: dict[str, float | int | None] = {"n_tokens": n, "sum_phi": float(phi.sum()) if n else 0.0}
    if n == 0:
        stats.update(avg_phi=None, avg_logp=None, avg_entropy=None, frac_phi_pos=None)
        stats.update({threshold_key(t): None for t in thresholds})
        return stats
    stats.update(
        avg_phi=float(phi.mean()),
        avg_logp=float(scores.logp.mean()),
        avg_entropy=float(scores.entropy.mean()),
        frac_phi_pos=float((phi > 0).float().mean()),
    )
    stats.update({threshold_key(t): float((phi > t).float().mean()) for t in thresholds})
    return stats


def threshold_key(threshold: float) -> str:
    """Column name of the share of tokens with phi above `threshold`, e.g. 'frac_phi_gt_-3'."""
    return f"frac_phi_gt_{threshold:g}"
