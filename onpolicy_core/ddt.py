"""Distribution Discriminant Theory scoring (paper Sec. 3, Eq. for the centred log-likelihood).

phi_t = log p_tau(x_t | x_<t) + H_tau(p_t)

p_tau is the model's next-token distribution at temperature tau and H_tau its entropy. For tokens
sampled from p_tau itself E[phi_t | context] = 0, so the mean phi of a response measures how far it
sits from the model's own distribution (strongly negative: text the model would not write).

Pure tensor code: no files, no tracking. The batched scorer runs the backbone once per batch, keeps
only the hidden states that predict response tokens (the LM head never sees prompt positions),
and projects them through the LM head in chunks of positions, so the vocabulary-sized temporaries
are `chunk_size x vocab`, independent of batch size and length. The log-softmax/entropy math of each
chunk is TRL's `selective_log_softmax_and_entropy` (a fused Triton kernel on GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from trl.trainer.utils import selective_log_softmax_and_entropy

MIN_SHARED_PREFIX = 8


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


def _lm_head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
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


@torch.no_grad()
def score_batch(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    temperature: float = 1.0,
    chunk_size: int = 256,
    pad_token_id: int = 0,
) -> list[TokenScores]:
    """Teacher-forced log p, entropy (and so phi) of every response token, for a batch of pairs.

    Rows are right-padded: with causal attention, padding after a sequence cannot change the
    scores of its own tokens, so a pair scores the same alone or in any batch (up to float
    rounding). A shared prompt prefix is run once. A response of zero tokens gets empty tensors.
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
    shared = shared if shared >= MIN_SHARED_PREFIX and len(inputs) > 1 else 0
    width = max(len(x) for x in inputs) - shared
    device = next(model.parameters()).device
    input_ids = torch.full((len(inputs), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(inputs), width), dtype=torch.long)
    targets = torch.full((len(inputs), width), -100, dtype=torch.long)
    for row, (p, r, x) in enumerate(zip(prompt_ids, response_ids, inputs)):
        rest = x[shared:]
        input_ids[row, : len(rest)] = torch.tensor(rest, dtype=torch.long)
        attention[row, : len(rest)] = 1
        if r:  # position len(p)-1+j (of the full row) predicts response token j
            start = len(p) - 1 - shared
            targets[row, start : start + len(r)] = torch.tensor(list(r), dtype=torch.long)
    mask = targets != -100
    out_logp = torch.zeros(int(mask.sum()), dtype=torch.float32)
    out_entropy = torch.zeros_like(out_logp)
    if mask.any():
        backbone_kwargs: dict = {"use_cache": False}
        if shared:
            cache = DynamicCache(config=model.config)
            model.base_model(input_ids=torch.tensor([list(prompt_ids[0][:shared])], device=device),
                             past_key_values=cache, use_cache=True)
            cache.batch_repeat_interleave(len(inputs))
            attention = torch.cat([torch.ones((len(inputs), shared), dtype=torch.long), attention], dim=1)
            positions = torch.arange(shared, shared + width).expand(len(inputs), width)
            backbone_kwargs = {"past_key_values": cache, "use_cache": True, "position_ids": positions.to(device)}
        hidden = model.base_model(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), **backbone_kwargs
        ).last_hidden_state
        selected = hidden[mask.to(device)]
        labels = targets[mask].to(device)
        for start in range(0, selected.shape[0], chunk_size):
            logits = _lm_head_logits(model, selected[start : start + chunk_size]).float()
            logp, entropy = selective_log_softmax_and_entropy(
                logits, labels[start : start + chunk_size], entropy_requires_grad=False, temperature=temperature
            )
            out_logp[start : start + chunk_size] = logp.cpu()
            out_entropy[start : start + chunk_size] = entropy.cpu()
    lengths = [len(r) for r in response_ids]
    return [TokenScores(lp, ent) for lp, ent in zip(out_logp.split(lengths), out_entropy.split(lengths))]


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
) -> list[TokenScores]:
    """`score_batch` over any number of (prompt, response) pairs, batched by length; results in
    input order. `on_batch(n_examples, n_tokens)` is called after each batch (progress bars)."""
    out: list[TokenScores | None] = [None] * len(pairs)
    lengths = [len(p) + len(r) for p, r in pairs]
    for batch in length_batches(lengths, max_tokens_per_batch, max_batch_size):
        scores = score_batch(model, [pairs[i][0] for i in batch], [pairs[i][1] for i in batch],
                             temperature=temperature, chunk_size=chunk_size, pad_token_id=pad_token_id)
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
