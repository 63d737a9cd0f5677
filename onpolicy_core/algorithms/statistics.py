"""Uncertainty of evaluation results: intervals and paired tests (pure functions, no I/O).

Every accuracy the report prints carries n and a 95% interval, and every "A beats B" carries a paired
test on the same problems. The statistics come from statsmodels and scipy; this module only chooses
them and fixes their settings:

- accuracy over n problems: Wilson score interval (statsmodels `proportion_confint`);
- a mean of per-problem values (Avg@k, or accuracy averaged over seeds): percentile bootstrap over
  problems (scipy `bootstrap`);
- greedy A vs B on the same problems: exact McNemar test on the discordant pairs (statsmodels);
- per-problem values A vs B: paired bootstrap of the mean difference, whose two-sided p-value is read
  from the same bootstrap distribution, so p < alpha exactly when the interval excludes 0;
- several comparisons at once: Holm's step-down adjustment (statsmodels `multipletests`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Comparison:
    """A minus B on the same n problems: the difference, its 95% interval and a two-sided p-value."""

    diff: float
    low: float
    high: float
    p_value: float
    n: int
    test: str


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> Estimate:
    """Accuracy with the Wilson score interval (sound at 0, 1 and small n, unlike the normal one)."""
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    low, high = proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
    value = successes / n
    # At 0/n and n/n statsmodels' bound lands a rounding error past the value (6.9e-18 above 0 at
    # 0/48); the true bound is the value itself, and error bars below zero break plots downstream.
    return Estimate(value, min(float(low), value), max(float(high), value), n)


def _bootstrap_mean(values: np.ndarray, seed: int, confidence: float):
    from scipy.stats import bootstrap

    return bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
                     method="percentile", random_state=np.random.default_rng(seed), vectorized=True, axis=-1)


def bootstrap_mean(values: Sequence[float], seed: int = 0, confidence: float = CONFIDENCE) -> Estimate:
    """Mean of per-problem values with a percentile bootstrap interval over problems."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(values.mean())
    if np.all(values == values[0]):  # no spread: every resample has the same mean
        return Estimate(mean, mean, mean, int(values.size))
    ci = _bootstrap_mean(values, seed, confidence).confidence_interval
    # As wilson: the ends on the value's side, so error bars built from them are never negative.
    return Estimate(mean, min(float(ci.low), mean), max(float(ci.high), mean), int(values.size))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool], confidence: float = CONFIDENCE) -> Comparison:
    """Greedy accuracy of A minus B on the same problems: the exact (binomial) McNemar p-value on the
    discordant pairs, with a paired bootstrap interval of the difference (the exact test has none)."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.shape} vs {b.shape}")
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    p = 1.0 if table[0][1] + table[1][0] == 0 else float(mcnemar(table, exact=True).pvalue)
    d = bootstrap_mean(a.astype(float) - b.astype(float), confidence=confidence)
    return Comparison(d.value, d.low, d.high, min(1.0, p), int(a.size), "exact McNemar")


def paired_bootstrap(a: Sequence[float], b: Sequence[float], seed: int = 0, confidence: float = CONFIDENCE) -> Comparison:
    """Mean of A minus B over the same problems: percentile bootstrap interval and the two-sided
    p-value from the same resamples, 2 * min(P(d* <= 0), P(d* >= 0)) with the +1 correction."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if diff.size == 0:
        return Comparison(float("nan"), float("nan"), float("nan"), float("nan"), 0, "paired bootstrap")
    if np.all(diff == diff[0]):
        return Comparison(float(diff[0]), float(diff[0]), float(diff[0]), 1.0 if diff[0] == 0 else 0.0, int(diff.size),
                          "paired bootstrap")
    result = _bootstrap_mean(diff, seed, confidence)
    dist = result.bootstrap_distribution
    tail = min(np.sum(dist <= 0), np.sum(dist >= 0))
    p = min(1.0, 2 * (tail + 1) / (dist.size + 1))
    ci = result.confidence_interval
    return Comparison(float(diff.mean()), float(ci.low), float(ci.high), float(p), int(diff.size), "paired bootstrap")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values of a family of comparisons (NaNs pass through)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out.tolist()


def t_interval(mean: float, sd: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of a mean from its summary (mean, sample sd, n)."""
    from scipy.stats import t

    if n < 2:
        return float("nan"), float("nan")
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / np.sqrt(n)
    return mean - half, mean + half
