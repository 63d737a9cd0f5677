"""Answer grading is math-verify's, made safe for threads and pathological input."""

import threading
import time

import pytest

from onpolicy_core.algorithms import grading
from onpolicy_core.algorithms.grading import extract_answer, grade, last_boxed


def test_equivalent_forms_and_wrong_answers():
    assert grade("so the answer is $\\boxed{\\frac{1}{2}}$", "0.5").correct
    assert grade("The final answer is $\\boxed{1,005}$.", "1005").correct
    assert not grade("The final answer is $\\boxed{71}$.", "72").correct
    assert not grade("I cannot solve this.", "72").correct
    assert extract_answer("Thus \\boxed{x^2+1}.") is not None


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b^{2}}}") == "\\frac{a}{b^{2}}"
    assert last_boxed("none") is None
    assert last_boxed("\\boxed{unclosed") is None


def test_grading_off_the_main_thread_uses_a_worker_process():
    results = []
    worker = threading.Thread(target=lambda: results.append(grade("\\boxed{3}", "3")))
    worker.start()
    worker.join(timeout=120)
    assert results and results[0].correct


def test_a_hanging_check_is_killed_not_waited_for():
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="worker killed"):
        # A sleep stands in for a pathological expression that never finishes.
        grading.run_in_worker(time.sleep, 60, timeout=1)
    assert time.perf_counter() - start < 30
    after = []
    worker = threading.Thread(target=lambda: after.append(grade("\\boxed{4}", "4")))
    worker.start()
    worker.join(timeout=120)
    assert after and after[0].correct, "the grader works again after a kill"
