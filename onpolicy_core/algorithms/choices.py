"""Multiple-choice scoring by log-likelihood (the lm-evaluation-harness `multiple_choice` method).

Per question, each choice's continuation is scored as sum_j log p(c_j | context, c_<j); the predicted
answer is the argmax of that sum (acc) or of the sum divided by the choice's character length
(acc_norm, as lm-eval normalises). Pure tensor code: no files, no tracking.

Why it is written here: lm-eval (not a dependency) runs one full forward of context + continuation
per choice. This module runs each question's context once and scores only the choices on top of it:
one right-padded forward of the contexts of a batch of questions fills a KV cache, the cache is
expanded to one row per choice (`DynamicCache.reorder_cache`), and one forward of all the choices,
each at its own positions after its context, reads the rest. No library offers that prefix reuse
for a set of continuations with a fused reading of only the scored positions, so it is by hand; the
LM-head scaling and bf16 autocast are `ddt`'s, the cache is transformers', and `reference_logprob` is
the naive method, kept as the ground truth for tests and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from onpolicy_core.algorithms.ddt import lm_head_logits, matmul_autocast
from onpolicy_core.algorithms.options import ScorePrecision as Precision

HEAD_CHUNK = 256
"""Scored positions per LM-head call: bounds the `chunk x vocabulary` fp32 temporaries."""


@dataclass
class ChoiceScores:
    """One question's choices: summed log-probability (float32) and token count of each continuation."""

    logprobs: torch.Tensor
    tokens: torch.Tensor


def encode_question(tokenizer, context: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]], int]:
    """(context ids, continuation ids per choice, boundary fallbacks), lm-eval's way: the continuation's
    tokens are those of `context + continuation` after the tokens of `context` alone, so a choice is
    tokenised as it reads after the prompt. Where the two disagree on the prefix (a token that merges
    across the boundary), the continuation is encoded on its own instead and counted, so the
    context/continuation boundary is always exact: the context ids are the same for every choice."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    out, fallbacks = [], 0
    for continuation in continuations:
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
            out.append(whole[len(context_ids):])
        else:
            out.append(tokenizer(continuation, add_special_tokens=False)["input_ids"])
            fallbacks += 1
    return context_ids, out, fallbacks


@torch.no_grad()
def score_choices(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[Sequence[int]]],
    pad_token_id: int = 0,
    precision: Precision = "fp32",
) -> list[ChoiceScores]:
    """Summed log p of every choice of a batch of questions, each context run once.

    contexts[i] is question i's context, continuations[i] its choices (each at least one token). Two
    forwards for the whole batch: the contexts (right-padded, positions 0..), then every choice of
    every question as one row on a copy of its question's cache (its context's padding masked out,
    positions continuing after the context). The first choice token is predicted by the context's
    last position, token j by the choice's position j-1, so the choice's last token is never fed.
    Softmax in fp32 whatever `precision` autocasts.
    """
    if len(contexts) != len(continuations):
        raise ValueError("contexts and continuations differ in length")
    if any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least one token")
    if any(len(ch) == 0 for chs in continuations for ch in chs) or any(len(chs) == 0 for chs in continuations):
        raise ValueError("every question needs choices, and every choice at least one token")
    device = next(model.parameters()).device
    ctx_len = [len(c) for c in contexts]
    width = max(ctx_len)
    ctx_ids = torch.full((len(contexts), width), pad_token_id, dtype=torch.long)
    ctx_mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for i, c in enumerate(contexts):
        ctx_ids[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
        ctx_mask[i, : len(c)] = 1
    owner = [i for i, chs in enumerate(continuations) for _ in chs]  # the question of each choice row
    rows = [list(ch) for chs in continuations for ch in chs]
    fed = max(len(r) for r in rows) - 1  # the last token of a choice predicts nothing
    with matmul_autocast(device, precision):
        cache = DynamicCache(config=model.config)
        hidden_ctx = model.base_model(input_ids=ctx_ids.to(device), attention_mask=ctx_mask.to(device),
                                      past_key_values=cache, use_cache=True).last_hidden_state
        last = hidden_ctx[torch.arange(len(contexts), device=device), torch.tensor(ctx_len, device=device) - 1]
        hidden_choices = None
        if fed > 0:
            index = torch.tensor(owner, dtype=torch.long, device=device)
            cache.reorder_cache(index)  # one copy of its question's context per choice row
            ids = torch.full((len(rows), fed), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), fed), dtype=torch.long)
            for r, tokens in enumerate(rows):
                ids[r, : len(tokens) - 1] = torch.tensor(tokens[:-1], dtype=torch.long)
                mask[r, : len(tokens) - 1] = 1
            positions = torch.tensor([ctx_len[q] for q in owner])[:, None] + torch.arange(fed)[None]
            attention = torch.cat([ctx_mask[owner], mask], dim=1)
            hidden_choices = model.base_model(input_ids=ids.to(device), attention_mask=attention.to(device),
                                              position_ids=positions.to(device), past_key_values=cache,
                                              use_cache=True).last_hidden_state
        # The hidden state that predicts each scored token, in row order, and the token it predicts.
        predictors, labels, row_of = [], [], []
        for r, tokens in enumerate(rows):
            predictors.append(last[owner[r]][None])
            if len(tokens) > 1:
                predictors.append(hidden_choices[r, : len(tokens) - 1])
            labels.extend(tokens)
            row_of.extend([r] * len(tokens))
        hidden = torch.cat(predictors)
        target = torch.tensor(labels, dtype=torch.long, device=device)
        token_logp = torch.empty(len(labels), dtype=torch.float32, device=device)
        for start in range(0, len(labels), HEAD_CHUNK):
            logits = lm_head_logits(model, hidden[start : start + HEAD_CHUNK]).float()
            logp = torch.log_softmax(logits, dim=-1)
            token_logp[start : start + HEAD_CHUNK] = logp.gather(1, target[start : start + HEAD_CHUNK, None])[:, 0]
    sums = torch.zeros(len(rows), dtype=torch.float32).index_add_(0, torch.tensor(row_of), token_logp.cpu())
    lengths = torch.tensor([len(r) for r in rows])
    out, start = [], 0
    for chs in continuations:
        out.append(ChoiceScores(sums[start : start + len(chs)], lengths[start : start + len(chs)]))
        start += len(chs)
    return out


def score_questions(model: torch.nn.Module, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[Sequence[int]]],
                    batch_size: int, pad_token_id: int = 0, precision: Precision = "fp32") -> list[ChoiceScores]:
    """`score_choices` over any number of questions, `batch_size` questions per batch, in input order."""
    out: list[ChoiceScores] = []
    for start in range(0, len(contexts), batch_size):
        out.extend(score_choices(model, contexts[start : start + batch_size], continuations[start : start + batch_size],
                                 pad_token_id=pad_token_id, precision=precision))
    return out


@torch.no_grad()
def reference_logprob(model: torch.nn.Module, context: Sequence[int], continuation: Sequence[int]) -> float:
    """The naive method (lm-eval's): one full forward of context + continuation, full logits, fp32
    softmax, the continuation's log-probabilities summed. Ground truth for tests and the benchmark."""
    ids = torch.tensor([list(context) + list(continuation)], device=next(model.parameters()).device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1, device=ids.device)
    return float(logp[positions, torch.tensor(list(continuation), device=ids.device)].sum())


def predictions(scores: ChoiceScores, char_lengths: Sequence[int]) -> tuple[int, int]:
    """(argmax of the summed log p, argmax of log p per character of the choice): lm-eval's acc and
    acc_norm; ties go to the first choice."""
    norm = scores.logprobs / torch.tensor([max(n, 1) for n in char_lengths], dtype=torch.float32)
    return int(torch.argmax(scores.logprobs)), int(torch.argmax(norm))
