"""The prime stage on the embedded model: a short SFT into the answer format on primer problems
disjoint from every data split, the raw and the primed model compared, and the starting policy
written for every later stage (the model's own files when priming is off)."""

import dataclasses
import json
import re

import pytest

from onpolicy_core.data.arithmetic import generate
from onpolicy_core.data.io import write_jsonl
from onpolicy_core.plumbing.models import weights_sha256
from onpolicy_core.stages.prime import primer_problems, priming_on, run_prime
from tests.conftest import default_config

BASE = default_config()


def _setup(tmp_path, model_dir, **prime):
    p = default_config("tracking.enabled=false")
    paths = dataclasses.replace(p.paths, model=str(model_dir), data=str(tmp_path / "data"), policy=str(tmp_path / "policy"),
                                prime=str(tmp_path / "prime"))
    model = dataclasses.replace(p.model, prime=dataclasses.replace(p.model.prime, **prime))
    return model, p.data, paths, p.tracking


def _write_splits(tmp_path, data, extra_question: str | None = None):
    a = data.arithmetic
    problems = generate(12, a.min_steps, a.max_steps, a.max_operand, seed=data.seed)
    rows = [q.to_dict() for q in problems]
    if extra_question:
        rows[0]["question"] = extra_question
    write_jsonl(tmp_path / "data" / "train.jsonl", rows[:6])
    write_jsonl(tmp_path / "data" / "val.jsonl", rows[6:8])
    write_jsonl(tmp_path / "data" / "eval.jsonl", rows[8:])


def test_priming_is_on_for_the_embedded_model_only():
    m = BASE.model
    assert m.prime.enabled == "auto" and priming_on(m)
    assert not priming_on(dataclasses.replace(m, source="Qwen/Qwen2.5-Math-1.5B"))
    assert priming_on(dataclasses.replace(m, source="Qwen/Qwen2.5-Math-1.5B", prime=dataclasses.replace(m.prime, enabled="on")))
    assert not priming_on(dataclasses.replace(m, prime=dataclasses.replace(m.prime, enabled="off")))


def test_primer_set_is_disjoint_from_the_data_splits():
    prime = dataclasses.replace(BASE.model.prime, n=20, check_n=5)
    first = primer_problems(prime, BASE.data, set())
    taken = {first[0][0].question, first[1][0].question}
    train, held_out, dropped = primer_problems(prime, BASE.data, taken)
    assert dropped == 2 and not taken & {p.question for p in train + held_out}
    assert len(train) == 20 and len(held_out) == 5 and not {p.id for p in train} & {p.id for p in held_out}


def test_the_built_in_primer_is_written_in_another_style_than_the_training_data():
    """Primed on the training data's own worked sentences, the policy would write the training set
    already (DDT avg-phi +0.008 in the second CPU study): the default primer is bare equations."""
    assert BASE.model.prime.style == "terse"
    train, _, _ = primer_problems(dataclasses.replace(BASE.model.prime, n=8, check_n=1), BASE.data, set())
    worked, _, _ = primer_problems(dataclasses.replace(BASE.model.prime, n=8, check_n=1, style="worked"), BASE.data, set())
    assert [p.question for p in train] == [p.question for p in worked] and [p.answer for p in train] == [p.answer for p in worked]
    for terse, full in zip(train, worked):
        equations = terse.solution.splitlines()[:-1]
        assert equations and all(re.fullmatch(r"\d+ [-+*/] \d+ = \d+", line) for line in equations), terse.solution
        assert [line.rsplit(": ", 1)[1].rstrip(".") for line in full.solution.splitlines()[1:-1]] == equations
        item = terse.question.split("How many ")[1].split(" ")[0]
        assert terse.solution.endswith(f"$\\boxed{{{terse.answer}}}$ {item}.")
        assert "starts with" not in terse.solution and "The final answer" not in terse.solution


def test_a_hinted_share_of_the_primer_is_shown_with_its_worked_reference(tokenizer):
    """The hinted rows are the prompt Hinted Decoding's hinted stream gets (question, reference in the
    training data's worked style, CoT marker); their target is still the primer's own terse solution."""
    from onpolicy_core.algorithms.prompts import render_hinted_prompt, render_prompt
    from onpolicy_core.stages.prime import primer_rows

    prime = dataclasses.replace(BASE.model.prime, n=8, check_n=1, hinted_share=0.25)
    train, _, _ = primer_problems(prime, BASE.data, set())
    worked, _, _ = primer_problems(dataclasses.replace(prime, style="worked"), BASE.data, set())
    rows = primer_rows(tokenizer, train, prime, BASE.data, "# CoT")
    assert [r["completion"] for r in rows] == [p.solution + tokenizer.eos_token for p in train]
    assert [r["prompt"] for r in rows[:2]] == [render_hinted_prompt(tokenizer, p.question, w.solution, "# CoT\n")
                                               for p, w in zip(train[:2], worked[:2])]
    assert [r["prompt"] for r in rows[2:]] == [render_prompt(tokenizer, p.question) for p in train[2:]]
    assert "starts with" in rows[0]["prompt"] and "starts with" not in rows[0]["completion"]
    none = primer_rows(tokenizer, train, dataclasses.replace(prime, hinted_share=0.0), BASE.data, "# CoT")
    assert [r["prompt"] for r in none] == [render_prompt(tokenizer, p.question) for p in train]


def test_primes_the_embedded_model_and_compares_it_with_the_raw_one(tmp_path, embedded_model_dir):
    model, data, paths, tracking = _setup(tmp_path, embedded_model_dir, n=8, batch_size=4, check_n=4, check_max_new_tokens=24,
                                          learning_rate=3e-4)
    overlap = primer_problems(model.prime, data, set())[0][0].question
    _write_splits(tmp_path, data, extra_question=overlap)
    summary = run_prime(model, data, paths, tracking, BASE.realign.analysis.marker)
    assert summary["enabled"] and summary["steps"] == 2 and summary["overlap_dropped"] == 1
    for which in ("raw", "primed"):
        assert summary[which]["strict_accuracy"]["n"] == 4 and 0 <= summary[which]["truncated_rate"] <= 1
    assert weights_sha256(paths.policy) != weights_sha256(embedded_model_dir), "the policy is a trained model"
    provenance = json.loads((tmp_path / "policy" / "onpolicy_model.json").read_text())
    assert provenance["kind"] == "primed"
    assert json.loads((tmp_path / "prime" / "metrics.json").read_text())["enabled"] == 1


def test_priming_off_writes_the_models_own_files(tmp_path, embedded_model_dir):
    model, data, paths, tracking = _setup(tmp_path, embedded_model_dir, enabled="off")
    summary = run_prime(model, data, paths, tracking, BASE.realign.analysis.marker)
    assert not summary["enabled"] and "primed" not in summary
    assert weights_sha256(paths.policy) == weights_sha256(embedded_model_dir)


def test_priming_needs_the_data_splits(tmp_path, embedded_model_dir):
    from onpolicy_core.data.io import InputError

    model, data, paths, tracking = _setup(tmp_path, embedded_model_dir)
    with pytest.raises(InputError, match="disjoint"):
        run_prime(model, data, paths, tracking, BASE.realign.analysis.marker)
