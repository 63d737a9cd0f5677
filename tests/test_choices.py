"""Multiple-choice log-likelihood scoring (choices.py): the cached, batched scorer equals a naive full
forward of context + continuation per choice; tokenisation keeps the context/continuation boundary."""

from __future__ import annotations

import random

import pytest
import torch

from onpolicy_core.algorithms.choices import (
    encode_question,
    predictions,
    reference_logprob,
    score_choices,
    score_questions,
)
from tests.conftest import make_tiny_model


def _questions(seed: int, n: int, vocab: int = 128):
    rng = random.Random(seed)
    contexts = [[rng.randrange(2, vocab) for _ in range(rng.randrange(1, 14))] for _ in range(n)]
    choices = [[[rng.randrange(2, vocab) for _ in range(rng.randrange(1, 8))] for _ in range(rng.randrange(2, 6))] for _ in range(n)]
    return contexts, choices


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_cached_batched_scoring_equals_a_full_forward_per_choice(tiny_model, batch_size):
    contexts, choices = _questions(0, 7)
    assert len({len(c) for chs in choices for c in chs}) > 3, "choices of different lengths"
    scores = score_questions(tiny_model, contexts, choices, batch_size=batch_size)
    for context, chs, s in zip(contexts, choices, scores):
        assert s.logprobs.dtype == torch.float32 and s.tokens.tolist() == [len(c) for c in chs]
        naive = torch.tensor([reference_logprob(tiny_model, context, c) for c in chs])
        torch.testing.assert_close(s.logprobs, naive, atol=1e-4, rtol=0)


def test_single_token_choices_need_no_second_forward(tiny_model):
    contexts, choices = [[5, 6, 7], [9]], [[[3], [4]], [[8], [10], [11]]]
    for context, chs, s in zip(contexts, choices, score_choices(tiny_model, contexts, choices)):
        torch.testing.assert_close(s.logprobs, torch.tensor([reference_logprob(tiny_model, context, c) for c in chs]), atol=1e-4, rtol=0)


def test_bf16_autocast_stays_close_to_fp32():
    model = make_tiny_model(seed=1)
    contexts, choices = _questions(1, 4)
    fp32, bf16 = score_choices(model, contexts, choices), score_choices(model, contexts, choices, precision="bf16")
    for a, b in zip(fp32, bf16):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=0.1, rtol=0.02)


def test_bad_shapes_are_refused(tiny_model):
    with pytest.raises(ValueError, match="at least one token"):
        score_choices(tiny_model, [[1, 2]], [[[3], []]])
    with pytest.raises(ValueError, match="differ in length"):
        score_choices(tiny_model, [[1, 2]], [])


def test_acc_norm_divides_by_the_choice_characters():
    from onpolicy_core.algorithms.choices import ChoiceScores

    s = ChoiceScores(torch.tensor([-4.0, -6.0]), torch.tensor([2, 3]))
    assert predictions(s, [2, 6]) == (0, 1)  # -2.0 per char vs -1.0 per char
    assert predictions(ChoiceScores(torch.tensor([-1.0, -1.0]), torch.tensor([1, 1])), [3, 3]) == (0, 0), "ties: the first"


class _CharTokenizer:
    """One token per character, except that ': ' merges into one token (a merge across the boundary)."""

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            if text[i : i + 2] == ": ":
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_continuation_tokens_are_the_difference_or_encoded_alone_at_a_merge():
    tok = _CharTokenizer()
    context, conts, fallbacks = encode_question(tok, "Q\nA", [" yes", " no"])
    assert context == [ord("Q"), ord("\n"), ord("A")] and conts == [[ord(c) for c in " yes"], [ord(c) for c in " no"]]
    assert fallbacks == 0
    context, conts, fallbacks = encode_question(tok, "Answer:", [" yes"])  # 'Answer: yes' merges ': '
    assert context == [ord(c) for c in "Answer:"] and conts == [[ord(c) for c in " yes"]] and fallbacks == 1
