"""Hinted Decoding (paper Sec. 4): the batched, KV-cached generator against the batch-1 no-cache
reference, the lambda modes, the answer-marker switch, EOS and the repetition guard."""

import math
from collections import Counter

import pytest
import torch

from onpolicy_core.algorithms import hinted
from onpolicy_core.algorithms.hinted import (
    FIRST,
    MIX,
    PLAIN,
    hinted_generate,
    mix_step,
    mixing_lambda,
    reference_generate,
)
from tests.conftest import hinted_options, make_tiny_model

HINTED = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18, 19]]
PLAIN_PROMPTS = [[20, 21], [22, 23, 24, 25, 26, 27], [28]]


def decode(ids):
    return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def model():
    m = make_tiny_model(vocab_size=64, seed=3)
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)  # peaked distributions: entropies spread over (0, log V)
    return m


def _reference(model, opts, i, **kw):
    return reference_generate(model, model, HINTED[i], PLAIN_PROMPTS[i], *opts, [1], decode, **kw)


@pytest.mark.parametrize("prefill_rows", [True, False], ids=["rows", "batched"])
@pytest.mark.parametrize("beta", [0.0, 0.8, 3.0])
def test_batched_greedy_equals_the_batch1_no_cache_reference(model, beta, prefill_rows):
    opts = hinted_options(beta=beta, greedy=True, max_new_tokens=24, answer_marker=None)
    batched = hinted_generate(model, HINTED, PLAIN_PROMPTS, *opts, [1], decode, pad_token_id=0, prefill_rows=prefill_rows)
    for i, got in enumerate(batched):
        ref = _reference(model, opts, i)
        assert got.token_ids == ref.token_ids
        assert got.finish_reason == ref.finish_reason
        assert got.lambdas == pytest.approx(ref.lambdas, abs=1e-5)
        assert _reference(model, opts, i, use_cache=True).token_ids == ref.token_ids


def test_a_cache_that_outgrows_its_room_decodes_the_same(model, monkeypatch):
    """The in-place cache regrows by DECODE_ROOM positions when full (here every 5 tokens)."""
    opts = hinted_options(beta=0.8, greedy=True, max_new_tokens=24, answer_marker=None)
    monkeypatch.setattr(hinted, "DECODE_ROOM", 5)
    for got, i in zip(hinted_generate(model, HINTED, PLAIN_PROMPTS, *opts, [1], decode), range(3)):
        assert got.token_ids == _reference(model, opts, i).token_ids


NO_GUARD = dict(repetition_window=10**6)  # the tiny random model repeats itself; these tests are about other things


def test_beta_zero_is_plain_hinted_generation(model):
    opts = hinted_options(beta=0.0, greedy=True, max_new_tokens=16, answer_marker=None, **NO_GUARD)
    out = hinted_generate(model, HINTED, PLAIN_PROMPTS, *opts, [1], decode)
    for prompt, got in zip(HINTED, out):
        ids = list(prompt)
        for _ in range(16):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert got.token_ids == ids[len(prompt):]
        assert set(got.lambdas) == {0.0}


def test_sampling_is_seeded_per_pair_not_per_batch(model):
    opts = hinted_options(beta=0.8, temperature=1.0, top_p=0.9, max_new_tokens=12, answer_marker=None)
    full = hinted_generate(model, HINTED, PLAIN_PROMPTS, *opts, [1], decode, seeds=[11, 12, 13])
    part = hinted_generate(model, HINTED[1:], PLAIN_PROMPTS[1:], *opts, [1], decode, seeds=[12, 13])
    assert [d.token_ids for d in full[1:]] == [d.token_ids for d in part]
    assert full[2].token_ids == _reference(model, opts, 2, seed=13).token_ids
    other = hinted_generate(model, HINTED, PLAIN_PROMPTS, *opts, [1], decode, seeds=[11, 12, 14])
    assert other[2].token_ids != full[2].token_ids


def test_answer_marker_switches_to_the_plain_stream(model):
    free = hinted_generate(model, HINTED[:1], PLAIN_PROMPTS[:1], *hinted_options(beta=0.8, greedy=True, max_new_tokens=20, answer_marker=None), [1], decode)[0]
    marker_at = 3
    marker = decode(free.token_ids[marker_at : marker_at + 1])
    opts = hinted_options(beta=0.8, greedy=True, max_new_tokens=20, answer_marker=marker, marker_scope="rest")
    got = hinted_generate(model, HINTED[:1], PLAIN_PROMPTS[:1], *opts, [1], decode)[0]
    first = decode(free.token_ids).index(marker) // len(marker)  # marker may occur before index 3
    assert got.switched_at == first and got.token_ids[: first + 1] == free.token_ids[: first + 1]
    # after the switch, every token is the plain stream's own greedy choice
    ids = PLAIN_PROMPTS[0] + got.token_ids[: first + 1]
    for tok in got.token_ids[first + 1 :]:
        assert tok == int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(tok)
    assert len(got.lambdas) == first, "lambdas are recorded only for mixing steps (not token 0, not the tail)"
    assert got.token_ids == _reference(model, opts, 0).token_ids


BOX, CLOSE = 40, 41


def box_decode(ids):
    """Token 40 reads as the marker `\\boxed{`, 41 as `}`; every other id as <id>."""
    return "".join({BOX: "\\boxed{", CLOSE: "}"}.get(i, f"<{i}>") for i in ids)


@pytest.mark.parametrize("scope", ["box", "rest"])
def test_box_scope_hands_back_to_the_mixture_when_the_box_closes(scope):
    """marker_scope 'box': plain-only inside each box, mixing again after it, re-armed at the next
    box; 'rest' (the official demo): plain-only from the first marker to the end."""
    from onpolicy_core.algorithms.hinted import PairState

    opts = hinted_options(max_new_tokens=100, answer_marker="\\boxed{", marker_scope=scope, **NO_GUARD)[0]
    state = PairState(opts, {1}, box_decode, None)
    phases = []
    for token in [5, BOX, 7, 8, CLOSE, 9, 10, BOX, 11, CLOSE, 12]:
        state.push(token, 0.5)
        phases.append(state.phase)
    if scope == "box":
        assert phases == [MIX, PLAIN, PLAIN, PLAIN, MIX, MIX, MIX, PLAIN, PLAIN, MIX, MIX]
        assert state.switches == 2 and state.switched_at == 7
    else:
        assert phases == [MIX] + [PLAIN] * 10 and state.switches == 1 and state.switched_at == 1


@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "cache"])
def test_box_scope_batched_equals_the_reference(model, use_cache):
    """The batched generator and the batch-1 reference (which skips the hinted stream inside a box
    and must feed it every token it missed once the box closes) decode the same tokens."""
    free = hinted_generate(model, HINTED, PLAIN_PROMPTS, *hinted_options(beta=0.8, greedy=True, max_new_tokens=24, answer_marker=None, **NO_GUARD), [1], decode)
    tokens = [t for d in free for t in d.token_ids]
    box, close = max(set(tokens), key=tokens.count), sorted(set(tokens), key=tokens.count)[-2]
    mapping = {box: "\\boxed{", close: "}"}
    dec = lambda ids: "".join(mapping.get(i, f"<{i}>") for i in ids)
    opts = hinted_options(beta=0.8, greedy=True, max_new_tokens=24, answer_marker="\\boxed{", marker_scope="box", **NO_GUARD)
    got = hinted_generate(model, HINTED, PLAIN_PROMPTS, *opts, [1], dec)
    assert sum(d.switches for d in got) >= 2, "the test needs boxes to open and close"
    for i, d in enumerate(got):
        ref = reference_generate(model, model, HINTED[i], PLAIN_PROMPTS[i], *opts, [1], dec, use_cache=use_cache)
        assert d.token_ids == ref.token_ids and d.switches == ref.switches


def test_eos_stops_a_pair_including_on_the_first_token(model):
    opts = hinted_options(beta=0.5, greedy=True, max_new_tokens=20, answer_marker=None, **NO_GUARD)
    free = hinted_generate(model, HINTED, PLAIN_PROMPTS, *opts, [1], decode)
    eos = free[0].token_ids[0]  # pretend the first token of pair 0 is EOS
    out = hinted_generate(model, HINTED, PLAIN_PROMPTS, *opts, [eos], decode)
    assert out[0].token_ids == [] and out[0].finish_reason == "eos"
    for got, ref in zip(out[1:], free[1:]):  # other pairs unaffected until their own EOS
        cut = ref.token_ids.index(eos) if eos in ref.token_ids else None
        assert got.token_ids == ref.token_ids[:cut]
        assert got.finish_reason == ("eos" if cut is not None else "length")
    assert all(len(d.token_ids) == 20 for d in free if d.finish_reason == "length"), "exactly max_new_tokens"


def repeats(tokens: list[int], window: int, count: int) -> bool:
    """The offline reference of the rolling guard (PairState.push): does some `window`-token run
    occur at least `count` times in `tokens`?"""
    seen: Counter = Counter()
    for i in range(len(tokens) - window + 1):
        key = tuple(tokens[i : i + window])
        seen[key] += 1
        if seen[key] >= count:
            return True
    return False


def test_repetition_guard_reference():
    assert repeats([1, 2, 3] * 5, window=3, count=5)
    assert not repeats([1, 2, 3] * 4, window=3, count=5)
    assert repeats(list(range(10)) + [7, 7, 7, 7, 7], window=1, count=6)


def _looping_model():
    model = make_tiny_model(vocab_size=64, seed=3)
    with torch.no_grad():
        model.lm_head.bias = None
        model.lm_head.weight.zero_()
        model.lm_head.weight[9] = 1.0  # every position prefers token 9 ... forever
    return model


def test_repetition_guard_stops_decoding_at_the_first_repeat():
    opts = hinted_options(beta=0.5, greedy=True, max_new_tokens=500, answer_marker=None, repetition_window=4, repetition_count=5)
    out = hinted_generate(_looping_model(), HINTED[:2], PLAIN_PROMPTS[:2], *opts, [1], decode)
    assert [d.finish_reason for d in out] == ["repetition", "repetition"]
    assert all(len(d.token_ids) == 8 for d in out), "the 4-token run of 9s is seen a 5th time at token 8"


def test_repetition_guard_catches_a_loop_in_a_short_output():
    """The old guard (checked every 100 tokens) could not fire below 100 tokens: a loop ran to the limit."""
    opts = hinted_options(beta=0.5, greedy=True, max_new_tokens=40, answer_marker=None)  # defaults: window 10, count 4
    out = hinted_generate(_looping_model(), HINTED[:1], PLAIN_PROMPTS[:1], *opts, [1], decode)
    assert out[0].finish_reason == "repetition" and len(out[0].token_ids) == 13


@pytest.mark.parametrize("seed", range(5))
def test_rolling_guard_fires_at_the_first_prefix_that_repeats(seed):
    """Whatever the token stream, the guard stops exactly where the offline check `repeats` first holds."""
    from onpolicy_core.algorithms.hinted import PairState

    g = torch.Generator().manual_seed(seed)
    unit = torch.randint(2, 9, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
    stream = torch.randint(2, 30, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist() + unit * 12
    opts = hinted_options(max_new_tokens=10**6, answer_marker=None, repetition_window=4, repetition_count=3)
    state = PairState(opts[0], {1}, decode, None)
    for token in stream:
        state.push(token, 0.0)
        if state.finish:
            break
    stop = len(state.tokens)
    assert state.finish == "repetition"
    assert repeats(stream[:stop], 4, 3) and not repeats(stream[: stop - 1], 4, 3)


@pytest.mark.parametrize("h", [0.0, 0.1, 0.35, 0.5, 0.9, 1.0])
def test_lambda_modes_match_their_formulas(h):
    t = torch.tensor([h])
    assert float(mixing_lambda(t, hinted_options(beta=0.7, lambda_mode="linear")[1])) == pytest.approx(min(max(0.7 * h, 0), 1))
    assert float(mixing_lambda(t, hinted_options(beta=4.0, lambda_mode="sigmoid", sigmoid_center=0.4)[1])) == pytest.approx(1 / (1 + math.exp(-4.0 * (h - 0.4))))
    expected = 0.0 if h <= 0.3 else 1.0 if h >= 0.7 else (h - 0.3) / 0.4
    assert float(mixing_lambda(t, hinted_options(lambda_mode="piecewise", piecewise_bounds=(0.3, 0.7))[1])) == pytest.approx(expected)
    assert float(mixing_lambda(t, hinted_options(beta=0.0, lambda_mode="sigmoid")[1])) == pytest.approx(0.5)


def test_mix_step_phases_and_formula():
    torch.manual_seed(0)
    hint, plain = torch.randn(3, 50), torch.randn(3, 50)
    phase = torch.tensor([FIRST, MIX, PLAIN])
    mixed, lam = mix_step(hint, plain, phase, hinted_options(beta=0.9)[1])
    log_h, log_p = hint.log_softmax(-1), plain.log_softmax(-1)
    h = -(log_h.exp() * log_h).sum(-1) / math.log(50)
    assert lam[0] == 0 and lam[2] == 1 and lam[1] == pytest.approx(float(torch.clamp(0.9 * h[1], 0, 1)))
    torch.testing.assert_close(mixed[0], log_h[0])
    torch.testing.assert_close(mixed[2], log_p[2])
    torch.testing.assert_close(mixed[1], (1 - lam[1]) * log_h[1] + lam[1] * log_p[1])


def test_mix_step_takes_masked_logits():
    """-inf logits (a masked vocabulary) give no NaN: lambda uses the entropy over the unmasked
    tokens, a token masked in a stream with non-zero weight stays -inf, and in the first (hinted-only)
    and last (plain-only) phases the other stream's mask does not matter."""
    torch.manual_seed(1)
    hint, plain = torch.randn(3, 40), torch.randn(3, 40)
    hint[:, :10] = float("-inf")
    plain[:, 5:15] = float("-inf")
    phase = torch.tensor([FIRST, MIX, PLAIN])
    mixed, lam = mix_step(hint, plain, phase, hinted_options(beta=0.9)[1])
    assert not torch.isnan(mixed).any() and not torch.isnan(lam).any()
    kept = hint[1, 10:].log_softmax(-1)
    h = float(-(kept.exp() * kept).sum() / math.log(40))
    assert float(lam[1]) == pytest.approx(min(0.9 * h, 1.0), rel=1e-5)
    assert torch.isinf(mixed[1, :15]).all() and torch.isfinite(mixed[1, 15:]).all()
    torch.testing.assert_close(mixed[0], hint[0].log_softmax(-1))
    torch.testing.assert_close(mixed[2], plain[2].log_softmax(-1))
