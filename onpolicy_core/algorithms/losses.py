"""Token-weighted SFT losses as pure functions over per-token log-probabilities and entropies.

Every loss here is  -w_t * log p_t  averaged over response tokens, with a detached weight w_t:

    sft        w = 1                                     (plain SFT, negative log-likelihood)
    dft        w = p                                     (DFT, arXiv 2508.05629; TRL's loss_type="dft")
    eaft       w = H_K / ln K                            (EAFT, arXiv 2601.02151 Sec. 3: H_K is the entropy
                                                          of the softmax over the K largest logits, K = 20)
    eaft_full  w = H / ln V                              (the full-vocabulary variant of the EAFT gate)
    idft       w = p ** gamma_t                          (IDFT, paper Sec. 5)

with, for IDFT, phi_t = log p_t + H_t (the DDT score), gamma_raw = clamp(exp(-phi_t / beta),
gamma_min, gamma_max), gamma_t = 1 + lambda * (gamma_raw - 1), and lambda from `idft_lambda`:
0 during warm-up, a linear ramp over the transition, then 1. With lambda = 0 (or gamma = 1) IDFT is
exactly DFT.

IDFT follows the official trainer at the commit the project follows: the whole weight p ** gamma
is detached, and the loss takes log of p clamped to [1e-10, 1], so a token below the clamp gets no
gradient (`idft_log_probs`).

Inputs come from TRL's fused LM head (`log_probs`, `entropy`, `label_mask`), so no full-vocabulary
probability tensor is ever built for the batch (EAFT's top-K entropy needs the K largest logits).
"""

from __future__ import annotations

import math

import torch

from onpolicy_core.algorithms.options import IDFTOptions, TokenMethod

P_MIN = 1e-10

def idft_lambda(progress: float, warmup_ratio: float, transition_ratio: float) -> float:
    """Schedule of lambda over training progress in [0, 1]: 0, then a linear ramp, then 1."""
    if progress < warmup_ratio:
        return 0.0
    if transition_ratio <= 0 or progress >= warmup_ratio + transition_ratio:
        return 1.0
    return (progress - warmup_ratio) / transition_ratio


def idft_gamma(log_probs: torch.Tensor, entropy: torch.Tensor, lam: float, options: IDFTOptions) -> torch.Tensor:
    """gamma_t = 1 + lambda * (clamp(exp(-phi_t / beta), gamma_min, gamma_max) - 1), detached."""
    phi = (log_probs + entropy).detach()
    gamma_raw = torch.exp(-phi / options.beta).clamp(options.gamma_min, options.gamma_max)
    return 1.0 + lam * (gamma_raw - 1.0)


def idft_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """log of p clamped to [P_MIN, 1], as the official trainer takes it: tokens below the clamp keep
    log(P_MIN) and get zero gradient."""
    return torch.log(log_probs.exp().clamp(P_MIN, 1.0))


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy of the softmax over the k largest logits of each row (EAFT's approximation), detached."""
    top = torch.topk(logits.detach().float(), k=min(k, logits.shape[-1]), dim=-1).values
    log_p = torch.log_softmax(top, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def token_weights(method: TokenMethod, log_probs: torch.Tensor, entropy: torch.Tensor, *, lam: float = 1.0,
                  idft: IDFTOptions | None = None, vocab_size: int | None = None,
                  top_k_entropy: torch.Tensor | None = None, top_k: int | None = None) -> torch.Tensor:
    """The detached per-token weight w_t of `method` (see the module docstring)."""
    log_probs = log_probs.detach()
    if method == "sft":
        return torch.ones_like(log_probs)
    if method == "dft":
        return log_probs.exp()
    if method == "idft":
        if idft is None:
            raise ValueError("idft needs its IDFTOptions")
        p = log_probs.exp().clamp(min=P_MIN)
        return p ** idft_gamma(log_probs, entropy, lam, idft)
    if method == "eaft":
        if top_k_entropy is None or top_k is None:
            raise ValueError("eaft needs the top-K entropy and K")
        return (top_k_entropy.detach() / math.log(top_k)).clamp(min=0.0)
    if method == "eaft_full":
        if vocab_size is None:
            raise ValueError("eaft_full needs vocab_size to normalise the entropy")
        return (entropy.detach() / math.log(vocab_size)).clamp(min=0.0)
    raise ValueError(f"unknown token-weighted method {method!r}")


def token_loss(method: TokenMethod, log_probs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
               num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """The loss of `method`: weighted NLL, over the clamped log p for IDFT (`idft_log_probs`)."""
    return weighted_nll(idft_log_probs(log_probs) if method == "idft" else log_probs, weights, mask, num_items)


def weighted_nll(log_probs: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """sum(-w * log p over response tokens) / number of response tokens (finite zero when none)."""
    per_token = -(weights.detach() * log_probs) * mask
    count = mask.sum() if num_items is None else num_items
    return per_token.sum() / torch.as_tensor(count, device=per_token.device).clamp(min=1)


def histogram_shares(values: torch.Tensor, low: float, high: float, bins: int = 10) -> list[float]:
    """Share of `values` in each of `bins` equal bins over [low, high] (values outside are left
    out, as in the official trainer's diagnostics)."""
    values = values.detach().float().flatten()
    inside = values[(values >= low) & (values <= high)]
    if inside.numel() == 0:
        return [0.0] * bins
    counts = torch.histc(inside, bins=bins, min=low, max=high)
    return (counts / inside.numel()).tolist()


def summary_stats(values: torch.Tensor) -> dict[str, float]:
    """mean, std, min, max, median of a flat tensor (NaN-free; empty gives zeros)."""
    values = values.detach().float().flatten()
    if values.numel() == 0:
        return dict.fromkeys(("mean", "std", "min", "max", "median"), 0.0)
    return {"mean": float(values.mean()), "std": float(values.std()) if values.numel() > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max()), "median": float(values.median())}
