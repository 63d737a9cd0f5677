"""DDT scoring (paper Sec. 3): exact against the straightforward method, centred on the model's own
samples, and independent of padding and batch composition."""

import math

import pytest
import torch

from onpolicy_core.algorithms.ddt import (
    example_stats,
    length_batches,
    reference_scores,
    score_batch,
)
from tests.conftest import make_tiny_model

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
RESPONSES = [[20, 21, 22, 23, 24], [25, 26], [27, 28, 29, 30, 31, 32, 33, 34]]


@pytest.mark.parametrize("layout", ["unpadded", "padded"])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("chunk_size", [1, 3, 256])
def test_batched_scores_equal_the_full_softmax_reference(tiny_model, temperature, chunk_size, layout):
    batched = score_batch(tiny_model, PROMPTS, RESPONSES, temperature=temperature, chunk_size=chunk_size, layout=layout)
    for p, r, got in zip(PROMPTS, RESPONSES, batched):
        ref = reference_scores(tiny_model, p, r, temperature)
        torch.testing.assert_close(got.logp, ref.logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.entropy, ref.entropy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.phi, ref.logp + ref.entropy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["unpadded", "padded"])
def test_padding_and_batch_composition_do_not_change_an_example(tiny_model, layout):
    alone = score_batch(tiny_model, PROMPTS[:1], RESPONSES[:1], layout=layout)[0]
    for others in ([1], [2, 1], [1, 2]):
        batch_p = [PROMPTS[i] for i in others] + PROMPTS[:1]
        batch_r = [RESPONSES[i] for i in others] + RESPONSES[:1]
        again = score_batch(tiny_model, batch_p, batch_r, pad_token_id=3, layout=layout)[-1]
        torch.testing.assert_close(again.phi, alone.phi, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["unpadded", "padded"])
def test_a_shared_prompt_prefix_runs_once_and_changes_nothing(tiny_model, layout):
    """Prompts that share a chat header (>= 8 tokens, and here >= 10% of each row) reuse its keys
    and values: the same scores as alone."""
    header = list(range(40, 52))
    prompts = [header + p for p in PROMPTS]
    batched = score_batch(tiny_model, prompts, RESPONSES, chunk_size=4, layout=layout)
    for p, r, got in zip(prompts, RESPONSES, batched):
        ref = reference_scores(tiny_model, p, r)
        torch.testing.assert_close(got.phi, ref.logp + ref.entropy, atol=1e-5, rtol=1e-5)


def test_bf16_scores_stay_close_to_fp32(tiny_model):
    """bf16 autocast moves phi by float rounding only (the bench prints the size on real data)."""
    fp32 = score_batch(tiny_model, PROMPTS, RESPONSES)
    bf16 = score_batch(tiny_model, PROMPTS, RESPONSES, precision="bf16")
    for a, b in zip(fp32, bf16):
        assert b.phi.dtype == torch.float32
        torch.testing.assert_close(b.phi, a.phi, atol=0.05, rtol=0.02)


def test_zero_token_response_is_handled(tiny_model):
    out = score_batch(tiny_model, [[5, 6], [7]], [[], [8, 9]])
    assert out[0].phi.numel() == 0 and out[1].phi.numel() == 2
    stats = example_stats(out[0], [-1.0])
    assert stats["n_tokens"] == 0 and stats["avg_phi"] is None and stats["frac_phi_gt_-1"] is None
    only_empty = score_batch(tiny_model, [[5]], [[]])
    assert only_empty[0].phi.numel() == 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_phi_is_centred_on_the_models_own_samples(temperature):
    """E[phi_t | context] = 0 under p_tau: the mean over N sampled tokens is within 4 standard errors."""
    model = make_tiny_model(vocab_size=64, seed=1)
    # Sharpen the random model so its distributions are far from uniform (phi then varies a lot).
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    gen = torch.Generator().manual_seed(0)
    prompts = [[int(t) for t in torch.randint(2, 64, (4,), generator=gen)] for _ in range(24)]
    responses = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(40):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1] / temperature
                ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
            responses.append(ids[len(p):])
    phi = torch.cat([s.phi for s in score_batch(model, prompts, responses, temperature=temperature)]).double()
    n = phi.numel()
    stderr = phi.std().item() / math.sqrt(n)
    assert phi.std() > 0.2, "the test needs a model whose phi actually varies"
    assert abs(phi.mean().item()) < 4 * stderr, (phi.mean().item(), stderr)
    # The same responses at a different temperature are off-policy for that temperature.
    other = torch.cat([s.phi for s in score_batch(model, prompts, responses, temperature=temperature * 3)])
    assert abs(other.mean().item()) > 4 * stderr


def test_example_stats_shares():
    from onpolicy_core.algorithms.ddt import TokenScores

    s = TokenScores(torch.tensor([-0.5, -4.0, -0.1, -6.0]), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    stats = example_stats(s, [-1.0, -5.0])
    assert stats["n_tokens"] == 4
    assert stats["avg_phi"] == pytest.approx((0.5 - 4.0 - 0.1 - 6.0) / 4)
    assert stats["sum_phi"] == pytest.approx(-9.6)
    assert stats["frac_phi_pos"] == 0.25
    assert stats["frac_phi_gt_-1"] == 0.5 and stats["frac_phi_gt_-5"] == 0.75


def test_length_batches_respect_budgets_and_cover_everything():
    lengths = [5, 50, 7, 49, 6, 100, 3]
    batches = length_batches(lengths, max_tokens=120, max_batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 2 and len(b) * max(lengths[i] for i in b) <= 120 or len(b) == 1
    assert batches[0] == [5], "longest first"
