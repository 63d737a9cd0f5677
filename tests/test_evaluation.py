"""Avg@k and the unbiased pass@k estimator against hand-computed values, and the per-benchmark
metrics of the eval stage on hand-made rows."""

import math

import pytest

from onpolicy_core.algorithms.evaluation import (
    avg_at_k,
    mean_pass_at_k,
    pass_at_k,
    pass_ks,
)
from onpolicy_core.stages.eval import benchmark_metrics


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (4, 1, 1, 0.25),            # pass@1 = c / n
        (4, 1, 2, 1 - 3 / 6),       # 1 - C(3,2)/C(4,2)
        (4, 2, 2, 1 - 1 / 6),       # 1 - C(2,2)/C(4,2)
        (4, 0, 4, 0.0),             # nothing correct
        (4, 3, 2, 1.0),             # n - c < k: every k-subset holds a correct one
        (16, 4, 8, 1 - math.comb(12, 8) / math.comb(16, 8)),
        (200, 10, 100, 1 - math.comb(190, 100) / math.comb(200, 100)),
    ],
)
def test_pass_at_k_matches_the_combinatorial_formula(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_avg_and_mean_pass_over_problems():
    correct = [[True, False, False, False], [True, True, False, False], [False] * 4]
    assert avg_at_k(correct) == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))  # pass@1 is Avg@k
    assert mean_pass_at_k(correct, 2) == pytest.approx((0.5 + 5 / 6 + 0.0) / 3)
    assert math.isnan(avg_at_k([]))


def test_reported_ks():
    assert pass_ks(1) == [1]
    assert pass_ks(4) == [1, 2, 4]
    assert pass_ks(6) == [1, 2, 4, 6]
    assert pass_ks(16) == [1, 2, 4, 8, 16]


def _row(pid, mode, correct, n_tokens=10, boxed="1", finish="stop", strict=None):
    return {"problem_id": pid, "mode": mode, "correct": correct, "n_tokens": n_tokens, "boxed": boxed, "extracted": boxed,
            "finish_reason": finish, "strict_correct": correct and boxed is not None if strict is None else strict}


def test_benchmark_metrics_on_hand_made_rows():
    rows = [
        _row("a", "greedy", True), _row("b", "greedy", False, boxed=None, finish="length", n_tokens=30),
        _row("a", "sample", True), _row("a", "sample", True, boxed=None),
        _row("b", "sample", False), _row("b", "sample", False, boxed=None),
    ]
    m = benchmark_metrics(rows, samples=2)
    assert m["problems"] == 2
    assert m["greedy_accuracy"] == 0.5 and m["strict_greedy_accuracy"] == 0.5
    assert m["avg_at_k"] == pytest.approx(0.5), "lenient: the unboxed sample counts"
    assert m["strict_avg_at_k"] == pytest.approx(0.25), "strict: only the boxed one"
    assert m["pass_at_1"] == pytest.approx(0.5)
    assert m["pass_at_2"] == pytest.approx(0.5)
    assert m["no_answer_rate"] == pytest.approx(3 / 6)
    assert m["truncated_rate"] == pytest.approx(1 / 6)
    assert m["mean_response_tokens"] == pytest.approx((10 * 5 + 30) / 6)
