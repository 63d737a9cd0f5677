"""The realign stage on the embedded model: outputs, policy, summary, resume after a kill, and
the batched generator against the batch-1 reference on real prompts of mixed lengths."""

import json

import pytest

from onpolicy_core.algorithms import hinted
from onpolicy_core.algorithms.prompts import render_hinted_prompt, render_prompt
from onpolicy_core.data.arithmetic import generate
from onpolicy_core.data.io import read_jsonl
from onpolicy_core.plumbing.models import load_materialised
from onpolicy_core.stages import realign as realign_stage
from tests.conftest import (
    KilledOnCall,
    arithmetic_corpus,
    default_config,
    hinted_options,
)


def _config(model_dir, *overrides):
    """Small realign settings on the HF backend (sampled unless overridden), no tracking."""
    return default_config(f"paths.model={model_dir}", f"paths.policy={model_dir}", "tracking.enabled=false", "realign.backend=hf",
                          "realign.decoding.max_new_tokens=24", "realign.batch_size=2", *overrides)


@pytest.fixture
def corpus(tmp_path):
    return arithmetic_corpus(tmp_path / "train.jsonl", 5, 1, 4, 15, seed=9)


def test_greedy_batched_equals_reference_on_the_embedded_model(embedded_model_dir):
    model, tok = load_materialised(embedded_model_dir, dtype="float32")
    problems = generate(3, 1, 4, 30, seed=2)
    hinted_ids = [tok(render_hinted_prompt(tok, p.question, p.solution, "# CoT\n"), add_special_tokens=False)["input_ids"] for p in problems]
    plain_ids = [tok(render_prompt(tok, p.question), add_special_tokens=False)["input_ids"] for p in problems]
    assert len({len(h) for h in hinted_ids}) == 3, "mixed prompt lengths, so left padding is exercised"
    decode = lambda ids: tok.decode(ids)
    switches = []
    for beta in (0.0, 0.6):
        opts = hinted_options(beta=beta, greedy=True, max_new_tokens=40, answer_marker="\\boxed{")
        batched = hinted.hinted_generate(model, hinted_ids, plain_ids, *opts, [tok.eos_token_id], decode, pad_token_id=tok.pad_token_id)
        for h, p, got in zip(hinted_ids, plain_ids, batched):
            # batch 1 with a per-stream cache; its equality with the no-cache loop is
            # tests/test_hinted.py::test_batched_greedy_equals_the_batch1_no_cache_reference
            ref = hinted.reference_generate(model, model, h, p, *opts, [tok.eos_token_id], decode, use_cache=True)
            assert got.token_ids == ref.token_ids and got.finish_reason == ref.finish_reason
            assert got.switched_at == ref.switched_at
            switches.append(got.switched_at)
    assert any(at is not None for at in switches), "the answer-marker switch is exercised"


def test_realign_stage_writes_records_policy_and_summary(tmp_path, corpus, embedded_model_dir):
    out = tmp_path / "hinted"
    p = _config(embedded_model_dir, "realign.on_unverified=drop", "tracking.enabled=true")
    summary = realign_stage.run_realign(p.realign, p.paths, p.tracking, p.model, "hinted", corpus, out)
    records = read_jsonl(out / "records.jsonl")
    train = read_jsonl(out / "train.jsonl")
    assert len(records) == 5 and summary["examples"] == 5
    for r in records:
        assert r["finish_reason"] in ("eos", "length", "repetition")
        assert 0 < r["n_tokens"] <= 24 and isinstance(r["realigned"], str)
        assert r["avg_phi_original"] < 0.5 and r["outcome"] in ("realigned", "dropped")
    assert len(train) == sum(r["verified"] for r in records) == summary["outcomes"].get("realigned", 0)
    for r in records:  # strict verification: never a cut-off, looping or unboxed response
        assert not r["verified"] or (r["finish_reason"] == "eos" and r["boxed_answer"] is not None and r["rejection"] is None)
        assert r["verified"] or r["rejection"] in realign_stage.REJECTIONS
    assert sum(summary["rejections"].values()) == 5 - len(train)
    assert summary["eos_rate"] == pytest.approx(sum(r["finish_reason"] == "eos" for r in records) / 5)
    assert all(t["solution"] == t_r["realigned"] for t in train for t_r in records if t_r["id"] == t["id"])
    assert summary["beta"] == 0.5 and set(summary["avg_phi"]) == {"original", "hinted", "hinted_verified"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {"verified_rate": summary["verified_rate"], "eos_rate": summary["eos_rate"], "train_examples": len(train),
                       "avg_phi_realigned": summary["avg_phi"]["hinted"]}, "the DVC metrics file keeps the headline only"


def test_fallback_policy_keeps_every_example(tmp_path, corpus, embedded_model_dir):
    p = _config(embedded_model_dir, "realign.on_unverified=fallback", "realign.decoding.greedy=true")
    out = tmp_path / "sd"
    summary = realign_stage.run_realign(p.realign, p.paths, p.tracking, p.model, "self_distill", corpus, out)
    train = read_jsonl(out / "train.jsonl")
    assert len(train) == 5 and summary["beta"] == 0.0 and summary["mean_lambda"] in (0.0, None)
    for t in train:
        assert t["solution"] == (t["original_solution"] if t["realign_outcome"] == "fallback_original" else t["solution"])


def test_the_policy_decodes_in_model_dtype(tmp_path, corpus, embedded_model_dir, monkeypatch):
    """model.dtype is the one dtype setting: under bfloat16 (the paper preset) realign decodes in bf16."""
    p = _config(embedded_model_dir, "model.dtype=bfloat16", "realign.decoding.max_new_tokens=4")
    seen, real = [], realign_stage.realign_records

    def recording(model, *args, **kwargs):
        seen.append(str(model.dtype))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(realign_stage, "realign_records", recording)
    summary = realign_stage.run_realign(p.realign, p.paths, p.tracking, p.model, "hinted", corpus, tmp_path / "bf16")
    assert seen == ["torch.bfloat16"] and summary["dtype"] == "bfloat16"


def test_killed_realign_resumes_to_the_same_file(tmp_path, corpus, embedded_model_dir, monkeypatch):
    p = _config(embedded_model_dir, "realign.work_unit=2")  # sampled, seeded per example
    cfg, paths, tracking = p.realign, p.paths, p.tracking
    real = hinted.hinted_generate
    killed = KilledOnCall(real, kill_at=2)
    monkeypatch.setattr(realign_stage, "hinted_generate", killed)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        realign_stage.run_realign(cfg, paths, tracking, p.model, "hinted", corpus, out)
    assert not (out / "train.jsonl").exists()
    killed.reset()
    realign_stage.run_realign(cfg, paths, tracking, p.model, "hinted", corpus, out)
    assert killed.calls == 2, "the finished unit was reused: two batches left (units of 2 and 1)"
    monkeypatch.setattr(realign_stage, "hinted_generate", real)
    realign_stage.run_realign(cfg, paths, tracking, p.model, "hinted", corpus, tmp_path / "fresh")
    assert (out / "records.jsonl").read_text() == (tmp_path / "fresh" / "records.jsonl").read_text()


LOOP = ("Mia starts with 14 cookies.\n" + "One share of 14 is 2. " * 6 + "One share of 1")


def test_looping_truncated_text_is_not_verified_though_its_last_number_matches():
    """The case found on main: a loop cut off at the length limit, whose last number is the gold
    answer, was accepted because the grader falls back to the last number without a \\boxed{}."""
    from onpolicy_core.algorithms.grading import grade

    assert grade(LOOP, "1").correct, "the lenient (Qwen-style) grader accepts it"
    assert realign_stage.verify(LOOP, "length", "1") == (False, "truncated", None)
    assert realign_stage.verify(LOOP, "eos", "1") == (False, "no_boxed_answer", None)
    assert realign_stage.verify(LOOP, "repetition", "1")[:2] == (False, "repetitive")


@pytest.mark.parametrize(("text", "finish", "gold", "expected"), [
    ("14 / 7 = 2.\nThe final answer is $\\boxed{2}$.", "eos", "2", (True, None, "2")),
    ("14 / 7 = 2.\nThe final answer is $\\boxed{\\frac{4}{2}}$.", "eos", "2", (True, None, "\\frac{4}{2}")),
    ("14 / 7 = 2.\nThe final answer is $\\boxed{3}$.", "eos", "2", (False, "wrong_answer", "3")),
    ("14 / 7 = 2.\nThe final answer is $\\boxed{2}$.", "repetition", "2", (False, "repetitive", "2")),
    ("14 / 7 = 2.\nThe final answer is $\\boxed{2}$.", "length", "2", (False, "truncated", "2")),
    ("14 / 7 = 2. The final answer is 2.", "eos", "2", (False, "no_boxed_answer", None)),
])
def test_strict_verification_rules(text, finish, gold, expected):
    assert realign_stage.verify(text, finish, gold) == expected


COPIED = "8 / 4 = 2.\n2 / 4 = 1/2.\n1 / 1 = 1.\nThe final answer is $\\boxed{1}$."
"""Seen from a primed policy: the final answer copied from the hint, the steps wrong."""


@pytest.mark.parametrize(("text", "step_check", "expected"), [
    (COPIED, "none", (True, None, "1")),
    (COPIED, "arithmetic", (False, "wrong_step", "1")),
    ("8 + 4 = 13.\nThe final answer is $\\boxed{13}$.", "arithmetic", (False, "wrong_step", "13")),
    ("8 + 4 = 12.\n12 * 2 = 24.\nThe final answer is $\\boxed{24}$.", "arithmetic", (True, None, "24")),
    ("8 + 4 = 12.\nThe final answer is $\\boxed{12}$. Mia has 12 now.", "arithmetic", (True, None, "12")),
    ("8 + 4 = 12.\nThe final answer is $\\boxed{12}$. So the answer is 13.", "none", (False, "second_answer", "12")),
])
def test_steps_and_a_second_answer_are_checked_after_the_final_answer(text, step_check, expected):
    assert realign_stage.verify(text, "eos", expected[2] if expected[1] != "wrong_answer" else "0", step_check) == expected


def test_step_check_catches_arithmetic_and_chain_errors_and_passes_every_reference():
    from onpolicy_core.algorithms.grading import (
        answer_after_box,
        check_arithmetic_steps,
    )
    from onpolicy_core.data.arithmetic import generate

    assert check_arithmetic_steps("7 + 3 = 10. 10 \\times 2 = 20", "21").error == "final answer 21 is not the last result 20"
    assert check_arithmetic_steps("3 + 4 = 7 * 2 = 14", "14") == check_arithmetic_steps("3 + 4 = 7. 7 * 2 = 14.", "14")
    assert "does not start from" in check_arithmetic_steps(COPIED, "1").error
    assert check_arithmetic_steps("No steps here.", "5").steps == 0
    problems = generate(2000, 1, 6, 40, seed=7)
    assert not [p.id for p in problems if check_arithmetic_steps(p.solution, p.answer).error or answer_after_box(p.solution)]


def test_unverified_loops_never_reach_the_training_set():
    rows = [{"id": "a", "question": "q", "solution": "ref \\boxed{1}", "answer": "1", "source": "s", "realigned": LOOP,
             "verified": False, "rejection": "truncated"},
            {"id": "b", "question": "q", "solution": "ref \\boxed{2}", "answer": "2", "source": "s",
             "realigned": "so \\boxed{2}", "verified": True, "rejection": None}]
    for policy, kept in (("fallback", ["ref \\boxed{1}", "so \\boxed{2}"]), ("drop", ["so \\boxed{2}"])):
        train = realign_stage.apply_policy([dict(r) for r in rows], policy)
        assert [t["solution"] for t in train] == kept
