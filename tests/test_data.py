"""The data stage on the real benchmark files, the generator, and bad input."""

import json

import pytest

from onpolicy_core.algorithms.grading import grade
from onpolicy_core.algorithms.options import FieldMap
from onpolicy_core.data.arithmetic import generate
from onpolicy_core.data.io import read_jsonl
from onpolicy_core.data.sources import SourceError, gsm8k_solution, load_source
from onpolicy_core.stages.data import run_data
from tests.conftest import default_config

PLAIN_FIELDS = FieldMap(question="question", solution="solution", answer="answer", id=None)
GSM8K = FieldMap(question="question", solution="answer", answer=None, id=None)
MATH = FieldMap(question="problem", solution="solution", answer="answer", id="unique_id")
MINERVA = FieldMap(question="problem", solution="solution", answer=None, id="idx")
AIME = FieldMap(question="problem", solution="solution", answer="answer", id="id")

# Reference solutions that do not grade against their own gold, and why.
KNOWN_EXCEPTIONS = {
    # AIME 2024 I #... boxes the answer as '\textbf{(073)}'-style text; math-verify reads text, not 73.
    ("aime24", "75"),
}


def test_arithmetic_is_deterministic_and_self_consistent():
    a = generate(50, 2, 5, 20, seed=3)
    assert a == generate(50, 2, 5, 20, seed=3)
    assert a != generate(50, 2, 5, 20, seed=4)
    for p in a:
        assert grade(p.solution, p.answer).correct, p
        assert int(p.answer) >= 0
        # every worked line's arithmetic holds
        for line in p.solution.splitlines()[1:-1]:
            expr, result = line.split(": ", 1)[1].rstrip(".").split(" = ")
            assert eval(expr.replace("/", "//")) == int(result), line


def test_gsm8k_answer_split():
    solution, gold = gsm8k_solution("She has 2 + 3 = <<2+3=5>>5 apples.\n#### 1,005")
    assert gold == "1005"
    assert "<<" not in solution and solution.endswith("$\\boxed{1005}$.")


@pytest.mark.parametrize(
    "folder,fmt,fields",
    [("gsm8k/train.jsonl", "gsm8k", GSM8K), ("gsm8k/test.jsonl", "gsm8k", GSM8K),
     ("math500/test.jsonl", "math", MATH), ("minerva_math/test.jsonl", "math", MINERVA),
     ("aime24/test.jsonl", "math", AIME)],
)
def test_real_reference_solutions_grade_against_their_gold(shared_data, folder, fmt, fields):
    src = str(shared_data / folder)
    loaded = load_source(src, fmt, fields, max_chars=100_000)
    assert not loaded.skipped and len(loaded.problems) > 0
    wrong = {(folder.split("/")[0], p.id) for p in loaded.problems if not grade(p.solution, p.answer).correct}
    assert wrong <= KNOWN_EXCEPTIONS, sorted(wrong - KNOWN_EXCEPTIONS)[:10]


def test_amc23_has_no_solutions_and_loads_for_evaluation(shared_data):
    src = str(shared_data / "amc23/test.jsonl")
    fields = FieldMap(question="problem", solution=None, answer="answer", id="id")
    loaded = load_source(src, "fields", fields, max_chars=4000)
    assert len(loaded.problems) == 40 and all(p.solution == "" for p in loaded.problems)
    assert grade("so \\boxed{27}", loaded.problems[0].answer).correct  # gold '27.0'


def test_bad_rows_are_counted_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"question": "1+1?", "solution": "2", "answer": "2"}
    lines = [
        json.dumps(good).encode(),
        b"{not json",
        json.dumps({"solution": "x", "answer": "1"}).encode(),  # no question
        json.dumps({**good, "answer": "  "}).encode(),  # empty answer
        "{\"question\": \"caf\xe9\"}".encode("latin-1"),  # not UTF-8
        json.dumps({**good, "solution": "x" * 5000}).encode(),  # over-long
        json.dumps(good).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    loaded = load_source(str(path), "fields", PLAIN_FIELDS, max_chars=1000)
    assert len(loaded.problems) == 2
    assert dict(loaded.skipped) == {"invalid_json": 1, "missing_question": 1, "empty_answer": 1, "not_utf8": 1, "over_long": 1}
    assert loaded.examples["invalid_json"][0].startswith(f"{path}:2: invalid_json")
    assert loaded.examples["not_utf8"][0].startswith(f"{path}:5: not_utf8")


def test_zero_usable_records_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(SourceError, match=r"no usable records.*empty.jsonl:1: missing_solution"):
        load_source(str(path), "fields", PLAIN_FIELDS, max_chars=4000)
    with pytest.raises(SourceError, match="not found"):
        load_source(str(tmp_path / "nope.jsonl"), "fields", PLAIN_FIELDS, max_chars=4000)


def test_data_stage_writes_splits_and_summary(tmp_path):
    p = default_config("data.n_eval=10", "data.n_train=25", "data.arithmetic.n=60", f"paths.data={tmp_path}", "tracking.enabled=false")
    summary = run_data(p.data, p.paths, p.tracking)
    train, evals = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "eval.jsonl")
    assert (len(train), len(evals)) == (25, 10) == (summary["train"], summary["eval"])
    assert not {r["id"] for r in train} & {r["id"] for r in evals}
    assert set(train[0]) == {"id", "question", "solution", "answer", "source"}
    assert json.loads((tmp_path / "summary.json").read_text())["sources"][0]["skipped_total"] == 0
    assert not list(tmp_path.glob(".*tmp")), "no temporary files left behind"


def test_data_stage_gsm8k_with_separate_eval_source(tmp_path, shared_data):
    p = default_config(f"data.source={shared_data / 'gsm8k/train.jsonl'}", "data.format=gsm8k",
                       "data.fields={question: question, solution: answer, answer: null, id: null}",
                       f"data.eval_source={shared_data / 'gsm8k/test.jsonl'}", "data.n_eval=50", "data.n_train=100",
                       f"paths.data={tmp_path}", "tracking.enabled=false")
    summary = run_data(p.data, p.paths, p.tracking)
    assert (summary["train"], summary["eval"]) == (100, 50)
    assert all(r["source"].endswith("test.jsonl") for r in read_jsonl(tmp_path / "eval.jsonl"))
