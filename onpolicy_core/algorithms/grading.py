"""Final-answer extraction and equivalence, delegated to math-verify.

math-verify guards its parser with `signal.alarm`, which only works in the main thread. Off the main
thread (a Prefect task runner, a web server), `grade` runs the check in a worker process with the same
limits and kills it on overrun, so a pathological answer can never hang a run.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import multiprocessing
import operator
import re
import threading
from dataclasses import dataclass
from fractions import Fraction

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
    span = _last_box_span(text)
    return None if span is None else text[span[0] : span[1]].strip()


def _last_box_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the content of the last closed \\boxed{...} / \\fbox{...} in `text`."""
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
                return begin, i
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


# --- Checks beyond the final answer (realignment verification) ----------------------------------------
# Hand-written: math-verify compares final answers; nothing in it (or in another library here) checks
# the worked steps of a solution or what it says after its box.

_NUMBER = r"-?\d+(?:\.\d+)?"
_OPERATOR = r"(?:\+|-|\*|×|\\times|\\cdot|/|÷|\\div)"
_STEP = re.compile(rf"(?<![\w.])({_NUMBER}(?:\s*{_OPERATOR}\s*{_NUMBER})+)\s*=\s*({_NUMBER}(?:\s*/\s*\d+)?)(?!\d|\.\d)")
_SPELLING = {"×": "*", "\\times": "*", "\\cdot": "*", "÷": "/", "\\div": "/"}


def _exact(expression: str) -> Fraction | None:
    """The exact value of `a op b op c ...` (+ - * / with the usual precedence), None if not one."""
    for spelled, op in _SPELLING.items():
        expression = expression.replace(spelled, op)
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError:
        return None

    def value(node) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](value(node.left), value(node.right))
        raise ValueError(expression)

    try:
        return value(tree)
    except (ValueError, ZeroDivisionError):
        return None


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


@dataclass(frozen=True)
class StepCheck:
    """The `a op b = c` steps of a worked solution, checked exactly."""

    steps: int
    """Steps found."""
    error: str | None
    """The first problem found (a wrong step, a step that does not start from the previous result,
    a final answer that is not the last result), or None."""


def check_arithmetic_steps(text: str, final_answer: str | None) -> StepCheck:
    """Check every `a op b = c` of `text` exactly, as the built-in arithmetic task writes its steps:
    each result is right, each step after the first starts from the previous step's result (the task
    is one running total), and the boxed final answer is the last result. A right final answer copied
    from a hint with wrong or disconnected steps fails here. Not caught: a step that uses a number the
    question does not give, reasoning without `=` steps, and any non-arithmetic error."""
    steps, at = [], 0
    while (m := _STEP.search(text, at)) is not None:  # overlapping: "3 + 4 = 7 * 2 = 14" is two steps
        steps.append((m.group(1), m.group(2)))
        at = m.start(2)
    previous: Fraction | None = None
    for left, right in steps:
        stated, exact = _exact(right), _exact(left)
        if stated is None or exact is None:
            continue
        if exact != stated:
            return StepCheck(len(steps), f"wrong step: {left} = {right}")
        first = _exact(re.match(rf"\s*{_NUMBER}", left).group(0))
        if previous is not None and first != previous:
            return StepCheck(len(steps), f"step {left} = {right} does not start from the previous result {previous}")
        previous = stated
    if previous is not None and final_answer is not None and _exact(final_answer) not in (None, previous):
        return StepCheck(len(steps), f"final answer {final_answer} is not the last result {previous}")
    return StepCheck(len(steps), None)


def answer_after_box(text: str) -> str | None:
    """A number stated after the last \\boxed{} that differs from the boxed (numeric) answer, or None.
    A response that boxes one answer and then states another has no single final answer."""
    span = _last_box_span(text)
    if span is None or (value := _exact(text[span[0] : span[1]].replace(",", ""))) is None:
        return None
    tail = text[span[1] + 1 :]
    for number in re.findall(_NUMBER, tail.replace(",", "")):
        if Fraction(number) != value:
            return number
    return None
