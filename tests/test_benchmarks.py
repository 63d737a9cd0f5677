"""The benchmark registry on the real files: every benchmark loads, its gold answers grade a
correct boxed answer as correct and another problem's answer as wrong, and bad set-ups fail clearly."""

import re
from pathlib import Path

import pytest

from onpolicy_core.algorithms.grading import grade
from onpolicy_core.data.benchmarks import BenchmarkSource, Generator, load_benchmark
from onpolicy_core.data.registry import BENCHMARKS, FILE
from onpolicy_core.data.sources import SourceError

EXPECTED_SIZES = {"gsm8k": 1319, "math500": 500, "aime24": 30, "amc23": 40, "minerva": 272}
TRAIN = Generator(min_steps=2, max_steps=4, max_operand=20)


def _cfg(data_root, held_out=Path("unused.jsonl"), limit=None, seed=0, order="random", extra_steps=2, scale=2):
    return BenchmarkSource(data_root=str(data_root), allow_hub=False, limit=limit, limit_order=order, seed=seed,
                           held_out=Path(held_out), ood_extra_steps=extra_steps, ood_operand_scale=scale, custom={})


@pytest.mark.parametrize("name", sorted(n for n, b in BENCHMARKS.items() if b.kind == FILE))
def test_file_benchmarks_load_whole_and_grade_known_answers(shared_data, tmp_path, name):
    problems, report = load_benchmark(name, _cfg(shared_data), TRAIN)
    assert len(problems) == EXPECTED_SIZES[name] and not report.skipped
    assert len({p.id for p in problems}) == len(problems)
    checked = 0
    for p, other in zip(problems[:8], problems[1:9]):
        assert grade(f"So the answer is $\\boxed{{{p.answer}}}$.", p.answer).correct, (name, p.id, p.answer)
        if not grade(f"$\\boxed{{{other.answer}}}$", p.answer).correct:
            checked += 1
    assert checked >= 6  # another problem's answer is wrong (unless both golds happen to agree)


def test_limit_takes_a_seeded_sample_in_file_order(shared_data, tmp_path):
    a, _ = load_benchmark("math500", _cfg(shared_data, limit=20, seed=1), TRAIN)
    b, _ = load_benchmark("math500", _cfg(shared_data, limit=20, seed=1), TRAIN)
    c, _ = load_benchmark("math500", _cfg(shared_data, limit=20, seed=2), TRAIN)
    full, _ = load_benchmark("math500", _cfg(shared_data), TRAIN)
    order = {p.id: i for i, p in enumerate(full)}
    assert [p.id for p in a] == [p.id for p in b] != [p.id for p in c]
    assert [order[p.id] for p in a] == sorted(order[p.id] for p in a)
    first, _ = load_benchmark("math500", _cfg(shared_data, limit=20, seed=1, order="first"), TRAIN)
    assert [p.id for p in first] == [p.id for p in full[:20]], "limit_order first: the first 20 in file order"


def test_arithmetic_ood_is_harder_than_training_and_self_consistent(tmp_path):
    problems, _ = load_benchmark("arithmetic_ood", _cfg(tmp_path, limit=30), TRAIN)
    assert len(problems) == 30 and all(p.id.startswith("arithmetic_ood-") for p in problems)
    assert all(grade(p.solution, p.answer).correct for p in problems)
    assert all(p.solution.count("\n") - 1 >= TRAIN.max_steps + 1 for p in problems), "more steps than training"
    numbers = [int(n) for p in problems for n in __import__("re").findall(r"\d+", p.question)]
    assert max(numbers) > TRAIN.max_operand, "larger numbers than training"


def test_arithmetic_ood_without_extra_steps_shifts_the_numbers_alone(tmp_path):
    problems, _ = load_benchmark("arithmetic_ood", _cfg(tmp_path, limit=40, extra_steps=0, scale=3), TRAIN)
    assert all(grade(p.solution, p.answer).correct for p in problems)
    assert {p.solution.count("\n") - 1 for p in problems} == set(range(TRAIN.min_steps, TRAIN.max_steps + 1)), "the training's chains"
    starts = [int(re.search(r"has (\d+)", p.question).group(1)) for p in problems]
    assert max(starts) > 2 * TRAIN.max_operand and max(starts) <= 3 * TRAIN.max_operand


def test_held_out_split_is_the_data_stage_eval_file(tmp_path):
    from onpolicy_core.data.arithmetic import generate
    from onpolicy_core.data.io import write_jsonl

    path = tmp_path / "eval.jsonl"
    write_jsonl(path, (p.to_dict() for p in generate(5, 2, 3, 10, seed=0)))
    problems, _ = load_benchmark("arithmetic", _cfg(tmp_path, held_out=path), TRAIN)
    assert [p.id for p in problems] == [f"arithmetic-{i:05d}" for i in range(5)]
    with pytest.raises(SourceError, match="run `onpolicy data`"):
        load_benchmark("arithmetic", _cfg(tmp_path, held_out=tmp_path / "missing.jsonl"), TRAIN)


def test_missing_file_names_the_path_and_the_hub_option(tmp_path):
    with pytest.raises(SourceError, match=r"gsm8k/test.jsonl.*allow_hub.*openai/gsm8k"):
        load_benchmark("gsm8k", _cfg(tmp_path), TRAIN)


def test_unknown_benchmark_is_a_config_error():
    from onpolicy_core.plumbing.config import ConfigError, default_params

    with pytest.raises(ConfigError, match="unknown"):
        default_params(["eval.benchmarks=[gsm8k, olympiad]"])


SVAMP_ROWS = [  # the SVAMP layout (Body + Question, numeric Answer) and ASDiv-style golds with units
    {"ID": "chal-1", "Body": "Jack had 8 pens and Mary had 5 pens.", "Question": "How many pens do they have in all?", "Answer": 13.0},
    {"ID": "chal-2", "Body": "A tree is 9 m tall.", "Question": "How tall are two such trees?", "Answer": "18 (m)"},
]


def test_a_benchmark_declared_in_params_loads_with_template_and_units(tmp_path):
    import json

    from onpolicy_core.plumbing.config import ConfigError, default_params

    path = tmp_path / "svamp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SVAMP_ROWS))
    spec = (f"{{svamp: {{path: {path}, format: fields, question_template: '{{Body}} {{Question}}', "
            "answer_normalization: strip_units, fields: {question: Question, solution: null, answer: Answer, id: ID}}}")
    p = default_params([f"eval.custom_benchmarks={spec}", "eval.benchmarks=[arithmetic, svamp]"])
    where = BenchmarkSource(data_root="unused", allow_hub=False, limit=None, limit_order="random", seed=0, held_out=Path("x"),
                            ood_extra_steps=2, ood_operand_scale=2, custom=p.eval.custom_benchmarks)
    problems, report = load_benchmark("svamp", where, TRAIN)
    assert [p.id for p in problems] == ["chal-1", "chal-2"] and not report.skipped
    assert problems[0].question == "Jack had 8 pens and Mary had 5 pens. How many pens do they have in all?"
    assert [p.answer for p in problems] == ["13.0", "18"], "a unit after the number is not part of the gold answer"
    assert grade("So they have $\\boxed{13}$.", problems[0].answer).correct and grade("\\boxed{18}", problems[1].answer).correct
    with pytest.raises(ConfigError, match=r"eval.benchmarks: unknown \['svamp'\]"):
        default_params(["eval.benchmarks=[svamp]"])
    with pytest.raises(ConfigError, match=r"repeat built-in benchmark names"):
        default_params([f"eval.custom_benchmarks={spec.replace('svamp:', 'gsm8k:')}"])


@pytest.mark.parametrize("gold,expected", [("9 (apples)", "9"), ("4.5 cm", "4.5"), ("1,200 km", "1200"), ("-3", "-3"),
                                           ("3/4 cup", "3/4"), ("x + 1", "x + 1"), ("2.5e-3 \\text{ s}", "2.5e-3"),
                                           ("7.6 Z", "7.6 Z"), ("1,200.5 (m)", "1200.5")])
def test_strip_units_keeps_the_leading_number(gold, expected):
    from onpolicy_core.data.sources import strip_units

    assert strip_units(gold) == expected


def _minerva_golds(shared_data):
    """(gold, the LaTeX unit written right after its \\boxed{} in the solution or None) per Minerva row."""
    import json

    from onpolicy_core.data.sources import last_boxed

    rows = []
    for line in (shared_data / "minerva_math" / "test.jsonl").read_text().splitlines():
        solution = json.loads(line)["solution"]
        gold = last_boxed(solution)
        if gold is None:
            continue
        after = solution[solution.rfind("\\boxed{") + len("\\boxed{") + len(gold) + 1 :]
        unit = re.match(r"\s*(\\mathrm\{[^}]*\}|\\text\s*\{[^}]*\})", after)
        rows.append((gold, unit.group(1) if unit else None))
    return rows


def test_strip_units_on_real_minerva_answers(shared_data):
    """Real golds with units (Minerva writes the unit after the box: '\\boxed{1.6} \\mathrm{~cm}'): gold +
    unit strips to the boxed number, which grades a correct response as correct; every real gold
    without a unit ('1+\\sqrt{3} i', '2.2 \\tau', '7.6 Z') is left exactly as it is."""
    from onpolicy_core.data.sources import strip_units

    rows = _minerva_golds(shared_data)
    with_units = [(g, u) for g, u in rows if u is not None and re.fullmatch(r"-?[\d.]+(e-?\d+)?", g)]
    assert len(with_units) >= 40
    for gold, unit in with_units:
        assert strip_units(f"{gold} {unit}") == gold, (gold, unit)
        assert grade(f"So the answer is $\\boxed{{{gold}}}$.", strip_units(f"{gold} {unit}")).correct
    changed = [g for g, _ in rows if strip_units(g) != g]
    assert changed == [], f"golds without units were changed: {changed[:5]}"
