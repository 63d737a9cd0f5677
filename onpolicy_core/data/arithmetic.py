"""Built-in multi-step arithmetic word problems with worked solutions (the offline default corpus).

Deterministic for a given seed, so the pipeline's default data is reproducible anywhere without a
download. The same generator with more steps or larger numbers gives an out-of-distribution set.

Two solution styles over the same questions and numbers: 'worked' (the training data: a sentence per
step) and 'terse' (bare equations, the primer's style). Priming in the terse style teaches the answer
format without making the worked solutions the policy's own text, so the training data stays
off-policy for the primed model as it is for the models of the paper.
"""

from __future__ import annotations

import random

from onpolicy_core.algorithms.options import SolutionStyle
from onpolicy_core.data.records import Problem

NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Yuki", "Ines"]
ITEMS = ["apples", "marbles", "stickers", "coins", "books", "shells", "cards", "pencils", "cookies", "stamps"]
MULTIPLIERS = {2: "doubles", 3: "triples", 4: "quadruples"}


def _step(rng: random.Random, name: str, item: str, total: int, max_operand: int) -> tuple[str, str, int]:
    """One operation: (sentence for the question, line of the worked solution, new total)."""
    choices = ["add", "add", "sub", "mul"]
    if total > 1:
        choices.append("div")
    op = rng.choice(choices)
    if op == "sub" and total < 2:
        op = "add"
    if op == "add":
        k = rng.randint(1, max_operand)
        verb = rng.choice(["buys", "finds", "is given"])
        return (f"Then {name} {verb} {k} more {item}.", f"After getting {k} more: {total} + {k} = {total + k}.", total + k)
    if op == "sub":
        k = rng.randint(1, min(total - 1, max_operand))
        verb = rng.choice(["gives away", "loses", "uses"])
        return (f"Then {name} {verb} {k} {item}.", f"After losing {k}: {total} - {k} = {total - k}.", total - k)
    if op == "mul":
        k = rng.choice(sorted(MULTIPLIERS))
        return (
            f"Then {name} {MULTIPLIERS[k]} the number of {item}.",
            f"After multiplying by {k}: {total} * {k} = {total * k}.",
            total * k,
        )
    divisors = [d for d in range(2, min(total, max_operand) + 1) if total % d == 0]
    if not divisors:
        k = rng.randint(1, max_operand)
        return (f"Then {name} buys {k} more {item}.", f"After getting {k} more: {total} + {k} = {total + k}.", total + k)
    k = rng.choice(divisors)
    return (
        f"Then {name} shares the {item} equally among {k} friends, keeping one share.",
        f"One share of {total} split {k} ways: {total} / {k} = {total // k}.",
        total // k,
    )


def _terse(line: str) -> str:
    """The bare equation of a worked line ('After losing 3: 9 - 3 = 6.' -> '9 - 3 = 6')."""
    return line.rsplit(": ", 1)[1].rstrip(".")


def make_problem(rng: random.Random, index: int, steps: int, max_operand: int, prefix: str = "arithmetic",
                 style: SolutionStyle = "worked") -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, max_operand)
    sentences = [f"{name} has {total} {item}."]
    lines = [f"{name} starts with {total} {item}."]
    for _ in range(steps):
        sentence, line, total = _step(rng, name, item, total, max_operand)
        sentences.append(sentence)
        lines.append(line)
    sentences.append(f"How many {item} does {name} have now?")
    if style == "terse":
        lines = [_terse(line) for line in lines[1:]] + [f"So {name} has $\\boxed{{{total}}}$ {item}."]
    else:
        lines.append(f"The final answer is $\\boxed{{{total}}}$.")
    return Problem(
        id=f"{prefix}-{index:05d}",
        question=" ".join(sentences),
        solution="\n".join(lines),
        answer=str(total),
        source=prefix,
    )


def generate(n: int, min_steps: int, max_steps: int, max_operand: int, seed: int, prefix: str = "arithmetic",
             style: SolutionStyle = "worked") -> list[Problem]:
    """`n` problems with between `min_steps` and `max_steps` operations each, fixed by `seed`; the
    style changes the solutions' wording only, never the questions or numbers."""
    rng = random.Random(seed)
    return [make_problem(rng, i, rng.randint(min_steps, max_steps), max_operand, prefix, style) for i in range(n)]
