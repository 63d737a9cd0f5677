"""Final-answer extraction and equivalence, delegated to math-verify.

math-verify guards its parser with `signal.alarm`, which only works in the main thread. Off the main
thread (a Prefect task runner, a web server), `grade` runs the check in a worker process with the same
limits and kills it on overrun, so a pathological answer can never hang a run.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import threading
from dataclasses import dataclass

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5
WORKER_TIMEOUT_S = 30

# Gold answers are bare LaTeX/numbers ("72", "\\frac{1}{2}"); responses are free text with \boxed{}.
_GOLD_CONFIG = [LatexExtractionConfig(), ExprExtractionConfig()]
_PRED_CONFIG = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None
    """The response's final answer as math-verify read it; None when nothing could be extracted."""
    timed_out: bool = False


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced.

    Hand-written because math-verify returns parsed sympy objects, while the data stage needs the
    gold answer's LaTeX text verbatim (MATH's own convention for its `answer` field).
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
        i += 1
    return None


def _gold_text(gold: str) -> str:
    """Gold answers are math content; drop stray `$` (Minerva has 'a+$ $b') and wrap once."""
    gold = gold.strip()
    if "\\boxed" in gold:
        return gold
    return f"${gold.replace('$', ' ').strip()}$"


def _grade_here(response: str, gold: str) -> Grade:
    gold_parsed = parse(_gold_text(gold), extraction_config=_GOLD_CONFIG, parsing_timeout=PARSE_TIMEOUT_S)
    pred_parsed = parse(response, extraction_config=_PRED_CONFIG, parsing_timeout=PARSE_TIMEOUT_S)
    extracted = str(pred_parsed[-1]) if pred_parsed else None
    if not pred_parsed or not gold_parsed:
        return Grade(False, extracted)
    return Grade(bool(verify(gold_parsed, pred_parsed, timeout_seconds=VERIFY_TIMEOUT_S)), extracted)


_pool: cf.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _worker_pool() -> cf.ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        return _pool


def _reset_pool() -> None:
    global _pool
    with _pool_lock:
        if _pool is not None:
            for proc in list(getattr(_pool, "_processes", {}).values()):
                proc.kill()
            _pool.shutdown(wait=False, cancel_futures=True)
            _pool = None


def grade(response: str, gold: str) -> Grade:
    """Does the final answer of `response` equal `gold`? Safe in any thread; never hangs."""
    if threading.current_thread() is threading.main_thread():
        try:
            return _grade_here(response, gold)
        except TimeoutError:
            return Grade(False, None, timed_out=True)
    try:
        return run_in_worker(_grade_here, response, gold, timeout=WORKER_TIMEOUT_S)
    except TimeoutError:
        return Grade(False, None, timed_out=True)


def run_in_worker(fn, *args, timeout: float):
    """`fn(*args)` in the grading worker process; past `timeout` the worker is killed (and
    replaced on next use) and TimeoutError is raised."""
    future = _worker_pool().submit(fn, *args)
    try:
        return future.result(timeout=timeout)
    except cf.TimeoutError:
        _reset_pool()
        raise TimeoutError(f"grading took longer than {timeout}s; worker killed") from None


def grade_boxed(response: str, gold: str) -> Grade:
    """Strict grading: only the last \\boxed{...} of `response` counts as its final answer.

    `grade` follows the Qwen-style evaluation convention and falls back to the last number of the
    text when there is no \\boxed{}; that accepts a looping, cut-off response whose last number
    happens to match. Realignment verification and the strict accuracy use this instead.
    """
    boxed = last_boxed(response)
    if boxed is None:
        return Grade(False, None)
    verdict = grade(f"\\boxed{{{boxed}}}", gold)
    return Grade(verdict.correct, boxed, verdict.timed_out)


def extract_answer(response: str) -> str | None:
    """The final answer math-verify reads from `response` (None if there is none)."""
    return grade(response, "0").extracted
