"""The token-weighted loss family, analytically: IDFT against a straightforward full-softmax
reference of the official trainer's formula (value and gradient, float64), its reductions to DFT,
EAFT's top-K entropy gate, and the lambda schedule."""

import math

import pytest
import torch
from trl.trainer.utils import selective_log_softmax_and_entropy

from onpolicy_core.algorithms.losses import (
    histogram_shares,
    idft_lambda,
    token_loss,
    token_weights,
    topk_entropy,
    weighted_nll,
)
from onpolicy_core.algorithms.options import IDFTOptions

pytestmark = pytest.mark.unit

V = 37
OFFICIAL = IDFTOptions(beta=1.0, gamma_min=0.1, gamma_max=2.0, warmup_ratio=0.2, transition_ratio=0.1)


def _idft(**fields) -> IDFTOptions:
    import dataclasses

    return dataclasses.replace(OFFICIAL, **fields)


def _fused_like(logits, targets):
    """What TRL's fused LM head returns: per-token log p and entropy (no full softmax kept)."""
    return selective_log_softmax_and_entropy(logits, targets)


def reference_idft(logits, targets, mask, lam, p: IDFTOptions):
    """Straightforward: full softmax, then the official trainer's formula term by term (p clamped
    to [1e-10, 1]; the loss is -(p ** gamma).detach() * log of the clamped p)."""
    probs = torch.softmax(logits, -1)
    logprobs = torch.log_softmax(logits, -1)
    log_p = logprobs.gather(-1, targets[..., None])[..., 0]
    entropy = -(probs * logprobs).sum(-1)
    phi = log_p + entropy
    gamma_raw = torch.clamp(torch.exp(-phi / p.beta), p.gamma_min, p.gamma_max)
    gamma = 1 + lam * (gamma_raw - 1)
    prob = torch.clamp(log_p.exp(), 1e-10, 1.0)
    loss = -(prob ** gamma).detach() * torch.log(prob)
    return (loss * mask).sum() / mask.sum()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 7, V, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.randint(0, V, (3, 7), generator=g)
    mask = (torch.rand(3, 7, generator=g) > 0.3).double()
    return logits, targets, mask


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("params", [OFFICIAL, _idft(beta=0.5, gamma_min=0.5, gamma_max=1.5), _idft(gamma_min=0.1, gamma_max=0.5)])
def test_idft_equals_full_softmax_reference_in_value_and_gradient(lam, params):
    logits, targets, mask = _inputs(0)
    log_p, entropy = _fused_like(logits, targets)
    ours = token_loss("idft", log_p, token_weights("idft", log_p, entropy, lam=lam, idft=params), mask)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    ref = reference_idft(logits, targets, mask, lam, params)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-9, atol=1e-12)


def test_idft_tokens_below_the_clamp_get_no_gradient():
    """p < 1e-10: the loss takes log(1e-10) and the token's logits get zero gradient (the official
    trainer's clamp); with gamma_max < 1 the weight is large enough for this to matter."""
    logits = torch.zeros(1, 2, V, dtype=torch.float64)
    logits[0, 0, 0] = -40.0  # p(token 0) ~ e^-40 < 1e-10 at position 0
    logits.requires_grad_(True)
    targets, mask = torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.float64)
    log_p, entropy = _fused_like(logits, targets)
    params = _idft(gamma_min=0.1, gamma_max=0.5)
    loss = token_loss("idft", log_p, token_weights("idft", log_p, entropy, lam=1.0, idft=params), mask)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.all(grad[0, 0] == 0) and torch.any(grad[0, 1] != 0)
    unclamped = weighted_nll(log_p, token_weights("idft", log_p, entropy, lam=1.0, idft=params), mask)
    assert float((unclamped - loss).detach()) > 1e-6, "without the clamp the token's -log p is larger"
    torch.testing.assert_close(loss, reference_idft(logits, targets, mask, 1.0, params))


def test_idft_reduces_to_dft_with_lambda_zero_or_gamma_one():
    logits, targets, mask = _inputs(1)
    log_p, entropy = _fused_like(logits, targets)
    dft = weighted_nll(log_p, token_weights("dft", log_p, entropy), mask)
    at_zero = token_loss("idft", log_p, token_weights("idft", log_p, entropy, lam=0.0, idft=OFFICIAL), mask)
    gamma_one = token_loss("idft", log_p, token_weights("idft", log_p, entropy, lam=1.0, idft=_idft(gamma_min=1.0, gamma_max=1.0)), mask)
    torch.testing.assert_close(at_zero, dft)
    torch.testing.assert_close(gamma_one, dft)
    # and DFT is TRL's: -p.detach() * log p
    trl_dft = (-log_p * log_p.exp().detach() * mask).sum() / mask.sum()
    torch.testing.assert_close(dft, trl_dft)


def test_sft_and_eaft_weights():
    logits, targets, mask = _inputs(2)
    log_p, entropy = _fused_like(logits, targets)
    nll = weighted_nll(log_p, token_weights("sft", log_p, entropy), mask)
    torch.testing.assert_close(nll, (-log_p * mask).sum() / mask.sum())
    full = token_weights("eaft_full", log_p, entropy, vocab_size=V)
    torch.testing.assert_close(full, entropy.detach() / math.log(V))
    # EAFT (arXiv 2601.02151): entropy of the softmax renormalised over the K largest logits, / ln K
    k = 5
    top = torch.topk(logits.detach(), k, dim=-1).values
    q = torch.exp(top - torch.logsumexp(top, -1, keepdim=True))
    expected = -(q * torch.log(q)).sum(-1) / math.log(k)
    w = token_weights("eaft", log_p, entropy, top_k_entropy=topk_entropy(logits, k), top_k=k)
    torch.testing.assert_close(w, expected.to(w.dtype))
    assert not w.requires_grad and not full.requires_grad and float(w.max()) <= 1.0 + 1e-9
    uniform = torch.zeros(1, V)
    assert float(topk_entropy(uniform, k)) == pytest.approx(math.log(k)), "uniform over the top K: weight 1"
    with pytest.raises(ValueError):
        token_weights("eaft_full", log_p, entropy)
    with pytest.raises(ValueError):
        token_weights("eaft", log_p, entropy)


def test_no_response_tokens_give_a_finite_zero():
    logits, targets, _ = _inputs(3)
    log_p, entropy = _fused_like(logits, targets)
    loss = token_loss("idft", log_p, token_weights("idft", log_p, entropy, idft=OFFICIAL), torch.zeros(3, 7, dtype=torch.float64))
    assert loss.item() == 0.0


def test_lambda_schedule_three_phases():
    assert idft_lambda(0.0, 0.2, 0.1) == 0.0
    assert idft_lambda(0.19, 0.2, 0.1) == 0.0
    assert idft_lambda(0.25, 0.2, 0.1) == pytest.approx(0.5)
    assert idft_lambda(0.3, 0.2, 0.1) == pytest.approx(1.0)
    assert idft_lambda(0.9, 0.2, 0.1) == 1.0
    assert idft_lambda(0.0, 0.0, 0.0) == 1.0, "the official README run: both ratios 0 means lambda 1 throughout"


def test_histogram_shares():
    shares = histogram_shares(torch.tensor([-5.0, -0.5, 0.1, 0.2, 2.9, 10.0]), -3.0, 3.0, bins=6)
    assert shares == pytest.approx([0, 0, 0.25, 0.5, 0, 0.25])
