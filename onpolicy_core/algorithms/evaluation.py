"""Accuracy estimators for sampled evaluation (pure functions, no I/O).

Avg@k is the mean correctness over k samples per problem (the DFT/IDFT papers report Avg@16);
pass@k is the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained
on Code", Sec. 2.1: 1 - C(n - c, k) / C(n, k) for n samples of which c are correct.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct among `n` samples (needs k <= n)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # Product form of 1 - C(n-c, k) / C(n, k): exact in floating point for large n.
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the share of correct samples (Avg@k)."""
    if not correct:
        return float("nan")
    return sum(sum(row) / len(row) for row in correct) / len(correct)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems."""
    if not correct:
        return float("nan")
    return sum(pass_at_k(len(row), sum(row), k) for row in correct) / len(correct)


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... up to n, and n itself."""
    ks = [k for k in (2**i for i in range(16)) if k <= n]
    return ks if ks[-1] == n else ks + [n]
