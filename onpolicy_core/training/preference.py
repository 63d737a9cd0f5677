"""Preference pairs the way the DFT paper builds them for its DPO/SimPO baselines: several samples
per training prompt from the base model, labelled by math-verify against the gold answer;
chosen = a correct sample (or the reference solution when none is correct, if allowed),
rejected = an incorrect sample."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

from onpolicy_core.algorithms.options import NoCorrectPolicy


@dataclass(frozen=True)
class Pair:
    index: int
    """Index of the prompt the pair belongs to."""
    chosen: str
    rejected: str
    chosen_is_reference: bool


def build_pairs(samples: Sequence[Sequence[str]], correct: Sequence[Sequence[bool]], references: Sequence[str],
                no_correct: NoCorrectPolicy) -> tuple[list[Pair], Counter]:
    """At most one pair per prompt; counts per outcome say why prompts gave no pair."""
    if no_correct not in get_args(NoCorrectPolicy):
        raise ValueError(f"no_correct must be one of {get_args(NoCorrectPolicy)}")
    pairs, counts = [], Counter()
    for i, (texts, ok, reference) in enumerate(zip(samples, correct, references, strict=True)):
        wrong = [t for t, good in zip(texts, ok) if not good]
        right = [t for t, good in zip(texts, ok) if good]
        if not wrong:
            counts["skipped_all_correct"] += 1
            continue
        if right:
            pairs.append(Pair(i, right[0], wrong[0], False))
            counts["pair_correct_sample"] += 1
        elif no_correct == "reference" and reference:
            pairs.append(Pair(i, reference, wrong[0], True))
            counts["pair_reference_chosen"] += 1
        else:
            counts["skipped_no_correct"] += 1
    return pairs, counts
