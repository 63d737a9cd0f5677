"""Read a problem source (local JSONL/Parquet, a Hugging Face dataset, or the generator) into
`Problem` records, counting every skipped row by reason with its file and line."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from onpolicy_core.algorithms.grading import last_boxed
from onpolicy_core.algorithms.options import AnswerNormalization, DataFormat, FieldMap
from onpolicy_core.data.io import InputError, iter_jsonl
from onpolicy_core.data.records import Problem

GSM8K_CALC = re.compile(r"<<[^<>]*>>")
MAX_EXAMPLES_PER_REASON = 5


class SourceError(ValueError):
    """A source that cannot be used at all (missing, unreadable, or with zero usable records)."""


@dataclass
class LoadResult:
    problems: list[Problem] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    """Skip count per reason."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """The first few 'file:line: reason' messages per reason, for the summary and the log."""

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES_PER_REASON:
            shown.append(f"{where}: {reason}{' (' + detail + ')' if detail else ''}")


def gsm8k_solution(text: str) -> tuple[str, str]:
    """Split a GSM8K answer ('... #### 72') into (worked solution ending in \\boxed{72}, '72')."""
    if "####" not in text:
        raise ValueError("no '####' answer line")
    body, gold = text.rsplit("####", 1)
    gold = gold.strip().replace(",", "")
    body = GSM8K_CALC.sub("", body).strip()
    return f"{body}\nThe final answer is $\\boxed{{{gold}}}$.", gold


def _rows_from_file(path: Path, result: LoadResult) -> Iterator[tuple[str, dict]]:
    if not path.exists():
        raise SourceError(f"{path}: source file not found")
    if not path.is_file():
        raise SourceError(f"{path}: is a folder, not a .jsonl or .parquet file")
    if path.suffix == ".jsonl":
        for lineno, obj in iter_jsonl(path):
            if isinstance(obj, InputError):
                reason = "not_utf8" if "not UTF-8" in str(obj) else "invalid_json"
                result.skip(reason, f"{path}:{lineno}", str(obj).split(": ", 2)[-1])
                continue
            yield f"{path}:{lineno}", obj
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from exc
        for i, obj in enumerate(table.to_pylist(), start=1):
            yield f"{path}:row {i}", obj
    else:
        raise SourceError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")


def _rows_from_hub(dataset_id: str, hf_config: str | None, hf_split: str) -> Iterator[tuple[str, dict]]:
    import datasets  # imported here: slow, and only hub sources need it

    try:
        ds = datasets.load_dataset(dataset_id, hf_config, split=hf_split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"hf:{dataset_id}: cannot load split {hf_split!r} ({type(exc).__name__}: {first})") from exc
    for i, obj in enumerate(ds):
        yield f"hf:{dataset_id}[{hf_split}] row {i}", obj


NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.?\d+)(?:[eE][-+]?\d+)?(?:/\d+)?"
UNIT_TOKEN = (r"\s+|~|/|\\,|\\cdot|\\mu|\^\{?-?\d+\}?|\([^()]*\)|\\(?:text|mathrm)\s*\{[^{}]*\}|[A-Za-z]{2,}"
              r"|[mgsKhLAVWJN](?![A-Za-z])")
"""What may follow the number in a gold answer with a unit: words, a parenthesised phrase, \\text{}
or \\mathrm{} groups, '/', powers, and the one-letter SI units. A single other letter or any LaTeX math
('1+\\sqrt{3} i', '2.2 \\tau', '7.6 Z' in Minerva's golds) is part of the answer, not a unit."""
_LEADING_NUMBER = re.compile(rf"^\s*({NUMBER})(.*)$", re.DOTALL)
_ONLY_UNITS = re.compile(rf"(?:{UNIT_TOKEN})*")


def strip_units(answer: str) -> str:
    """'9 (apples)' -> '9', '1,200 km' -> '1200', '1.6 \\mathrm{~cm}' -> '1.6'. An answer is kept as it
    is unless it is a number followed only by unit words. Hand-written: math-verify normalises the
    model's LaTeX, not a dataset's plain-text gold answers."""
    match = _LEADING_NUMBER.match(answer)
    if not match:
        return answer
    rest = match.group(2)
    if rest.strip() and not (_ONLY_UNITS.fullmatch(rest) and re.search(r"[A-Za-z]", rest)):
        return answer
    return match.group(1).replace(",", "")


def _question(obj: dict, template: str) -> str:
    """The question from a template over the row's columns, e.g. '{Body} {Question}'."""
    try:
        return template.format_map(obj)
    except KeyError as exc:
        raise ValueError("missing_question", f"template field {exc.args[0]!r} absent") from exc


def _to_problem(obj: dict, index: int, fmt: str, fields: FieldMap, source: str, prefix: str,
                question_template: str | None = None, answer_normalization: AnswerNormalization = "none") -> Problem:
    """Map one raw row onto a Problem; raises ValueError('reason', 'detail') for a skip."""

    def get(name: str | None, role: str) -> str:
        if name is None:
            raise ValueError(f"missing_{role}", f"no column configured for {role}")
        value = obj.get(name)
        if value is None:
            raise ValueError(f"missing_{role}", f"field {name!r} absent or null")
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"bad_{role}", f"field {name!r} is {type(value).__name__}")
        return str(value)

    question = (_question(obj, question_template) if question_template else get(fields.question, "question")).strip()
    if fmt == "gsm8k":
        try:
            solution, answer = gsm8k_solution(get(fields.solution, "solution"))
        except ValueError as exc:
            if len(exc.args) == 2:
                raise
            raise ValueError("missing_answer", str(exc)) from exc
    elif fmt == "math":
        solution = get(fields.solution, "solution").strip()
        value = obj.get(fields.answer) if fields.answer else None
        answer = "" if value is None else str(value).strip()  # a numeric 0 is an answer
        answer = answer or (last_boxed(solution) or "")
        if "\\boxed" not in solution and answer:
            solution = f"{solution}\nThe final answer is $\\boxed{{{answer}}}$."
    else:  # fields; with no solution column the record is usable for evaluation only
        solution = get(fields.solution, "solution").strip() if fields.solution else ""
        answer = get(fields.answer, "answer").strip()
    if answer_normalization == "strip_units":
        answer = strip_units(answer)
    if not question:
        raise ValueError("empty_question", "")
    if not answer.strip():
        raise ValueError("empty_answer", "")
    if not solution and fields.solution:
        raise ValueError("empty_solution", f"field {fields.solution!r} is empty")
    ident = str(obj.get(fields.id)) if fields.id and obj.get(fields.id) is not None else f"{prefix}-{index:05d}"
    return Problem(id=ident, question=question, solution=solution, answer=answer, source=source)


def load_source(source: str, fmt: DataFormat, fields: FieldMap, max_chars: int, hf_config: str | None = None,
                hf_split: str = "train", question_template: str | None = None,
                answer_normalization: AnswerNormalization = "none") -> LoadResult:
    """Every usable record of file or hub `source` ('hf:<id>') in order, plus counted skips; records
    whose question + solution exceed `max_chars` are skipped. Zero usable records is an error."""
    result = LoadResult()
    rows = _rows_from_hub(source[3:], hf_config, hf_split) if source.startswith("hf:") else _rows_from_file(Path(source), result)
    seen: set[str] = set()
    prefix = source[3:].replace("/", "-") if source.startswith("hf:") else f"{Path(source).parent.name}-{Path(source).stem}"
    for index, (where, obj) in enumerate(rows):
        try:
            problem = _to_problem(obj, index, fmt, fields, source, prefix, question_template, answer_normalization)
        except ValueError as exc:
            reason, detail = (exc.args + ("",))[:2] if exc.args else ("invalid", "")
            result.skip(str(reason), where, str(detail))
            continue
        if len(problem.question) + len(problem.solution) > max_chars:
            result.skip("over_long", where, f"{len(problem.question) + len(problem.solution)} > {max_chars} chars")
            continue
        if problem.id in seen:
            result.skip("duplicate_id", where, problem.id)
            continue
        seen.add(problem.id)
        result.problems.append(problem)
    if not result.problems:
        detail = "; ".join(m for msgs in result.examples.values() for m in msgs[:2]) or "source is empty"
        raise SourceError(f"{source}: no usable records ({dict(result.skipped)}): {detail}")
    return result
