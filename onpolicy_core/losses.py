"""Token-weighted SFT losses as pure functions over per-token log-probabilities and entropies.

Every loss here is  -w_t * log p_t  averaged over response tokens, with a detached weight w_t:

    nll    w = 1                                        (plain SFT)
    dft    w = p                                        (DFT, arXiv 2508.05629; TRL's loss_type="dft")
    eaft   w = H_t / log V                              (EAFT, arXiv 2601.02151: entropy-gated)
    idft   w = p ** gamma_t                             (IDFT, paper Sec. 5)

with, for IDFT, phi_t = log p_t + H_t (the DDT score), gamma_raw = clamp(exp(-phi_t / beta),
gamma_min, gamma_max), gamma_t = 1 + lambda * (gamma_raw - 1), and lambda from `idft_lambda`:
0 during warm-up, a linear ramp over the transition, then 1. With lambda = 0 (or gamma = 1) IDFT is
exactly DFT.

The weight is detached for IDFT as stated in the paper (the official verl trainer detaches only
gamma, so its gradient also flows through p ** gamma; see docs/paper_map.md).

Inputs come from TRL's fused LM head (`log_probs`, `entropy`, `label_mask`), so no full-vocabulary
probability tensor is ever built for the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

P_MIN = 1e-10


@dataclass(frozen=True)
class IDFTParams:
    beta: float = 1.0
    gamma_min: float = 0.1
    gamma_max: float = 2.0


def idft_lambda(progress: float, warmup_ratio: float, transition_ratio: float) -> float:
    """Schedule of lambda over training progress in [0, 1]: 0, then a linear ramp, then 1."""
    if progress < warmup_ratio:
        return 0.0
    if transition_ratio <= 0 or progress >= warmup_ratio + transition_ratio:
        return 1.0
    return (progress - warmup_ratio) / transition_ratio


def idft_gamma(log_probs: torch.Tensor, entropy: torch.Tensor, lam: float, params: IDFTParams) -> torch.Tensor:
    """gamma_t = 1 + lambda * (clamp(exp(-phi_t / beta), gamma_min, gamma_max) - 1), detached."""
    phi = (log_probs + entropy).detach()
    gamma_raw = torch.exp(-phi / params.beta).clamp(params.gamma_min, params.gamma_max)
    return 1.0 + lam * (gamma_raw - 1.0)


def token_weights(method: str, log_probs: torch.Tensor, entropy: torch.Tensor, *, lam: float = 1.0,
                  idft: IDFTParams = IDFTParams(), vocab_size: int | None = None) -> torch.Tensor:
    """The detached per-token weight w_t of `method` (see the module docstring)."""
    log_probs = log_probs.detach()
    if method == "nll":
        return torch.ones_like(log_probs)
    if method == "dft":
        return log_probs.exp()
    if method == "idft":
        p = log_probs.exp().clamp(min=P_MIN)
        return p ** idft_gamma(log_probs, entropy, lam, idft)
    if method == "eaft":
        if vocab_size is None:
            raise ValueError("eaft needs vocab_size to normalise the entropy")
        return (entropy.detach() / math.log(vocab_size)).clamp(min=0.0)
    raise ValueError(f"unknown token-weighted method {method!r}")


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
