"""The report's statistics against their textbook formulas (no model, no files)."""

import math

import numpy as np
import pytest

from onpolicy_core.algorithms.statistics import (
    bootstrap_mean,
    holm,
    mcnemar_exact,
    paired_bootstrap,
    t_interval,
    wilson,
)

Z = 1.959963984540054


@pytest.mark.parametrize(("k", "n"), [(0, 16), (3, 16), (8, 16), (16, 16), (150, 300)])
def test_wilson_matches_the_score_interval_formula(k, n):
    p = k / n
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    e = wilson(k, n)
    assert (e.value, e.n) == (p, n)
    assert e.low == pytest.approx(max(0.0, centre - half), abs=1e-12)
    assert e.high == pytest.approx(min(1.0, centre + half), abs=1e-12)


@pytest.mark.parametrize("n", [1, 7, 48, 200, 500])
def test_wilson_never_crosses_the_value(n):
    """statsmodels puts the bound at 0/48 6.9e-18 above 0; error bars built from it went negative."""
    assert wilson(0, n).low == 0.0 and wilson(n, n).high == 1.0
    assert all(e.low <= e.value <= e.high for e in (wilson(k, n) for k in range(n + 1)))


def _binomial_two_sided(b, c):
    m = min(b, c)
    return min(1.0, 2 * sum(math.comb(b + c, i) for i in range(m + 1)) / 2 ** (b + c))


@pytest.mark.parametrize(("b", "c", "both", "neither"), [(7, 1, 20, 12), (3, 3, 10, 4), (0, 6, 5, 5), (0, 0, 8, 8)])
def test_exact_mcnemar_is_the_binomial_test_on_discordant_pairs(b, c, both, neither):
    a = [True] * both + [True] * b + [False] * c + [False] * neither
    other = [True] * both + [False] * b + [True] * c + [False] * neither
    result = mcnemar_exact(a, other)
    assert result.p_value == pytest.approx(_binomial_two_sided(b, c) if b + c else 1.0)
    assert result.diff == pytest.approx((b - c) / len(a))
    assert result.low <= result.diff <= result.high and result.n == len(a)


def test_paired_bootstrap_p_value_agrees_with_its_interval():
    rng = np.random.default_rng(0)
    for shift in (0.0, 0.05, 0.1, 0.3):
        a = rng.random(200)
        b = np.clip(a - shift + rng.normal(0, 0.2, 200), 0, 1)
        c = paired_bootstrap(a, b)
        assert c.diff == pytest.approx(float(np.mean(a - b)))
        assert (c.p_value < 0.05) == (c.low > 0 or c.high < 0), (shift, c)
    clear = paired_bootstrap(np.ones(50), np.zeros(50))
    assert clear.diff == 1.0 and clear.p_value == 0.0
    assert paired_bootstrap([0.5, 0.25], [0.5, 0.25]).p_value == 1.0


def test_bootstrap_mean_is_reproducible_and_brackets_the_mean():
    values = np.linspace(0, 1, 101) ** 2
    e = bootstrap_mean(values)
    assert e == bootstrap_mean(values), "seeded: the same bytes every run"
    assert e.low < e.value < e.high and e.n == 101
    assert bootstrap_mean([0.25] * 10).low == 0.25


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert math.isnan(holm([float("nan"), 0.01])[0])


def test_t_interval_with_the_tabulated_quantile():
    low, high = t_interval(1.0, 2.0, 10)
    half = 2.2621571627409915 * 2.0 / math.sqrt(10)  # t_{0.975, 9}
    assert (low, high) == pytest.approx((1.0 - half, 1.0 + half))
    assert all(math.isnan(x) for x in t_interval(1.0, 0.0, 1))
