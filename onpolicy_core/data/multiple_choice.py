"""Read the multiple-choice general-ability sets (ARC-Easy, ARC-Challenge, MMLU-STEM) and build their
prompts.

Files follow the `../shared/data` layout: `<data_root>/<name>/test.jsonl`, one question per line with
`question`, `choices` (list of strings) and `answer` (0-based index of the correct choice); `id` when
the file has one (ARC), else `<name>-<line>` (MMLU-STEM). A row with a missing or mistyped field, an
answer out of range or fewer than two choices is skipped and counted with its file and line; a
missing file is an error naming it.

Prompt: the "cloze" formulation lm-eval uses for ARC, `Question: {question}\\nAnswer:` with the
continuation ` {choice}`, plain text without a chat template (the log-likelihood of the answer text
itself). MMLU-STEM gets the same. lm-eval's MMLU default lists the lettered choices in the prompt and
scores the letters; a 135M model is at chance on that format (it cannot yet map a letter to an
answer), so the lettered score could not move when fine-tuning costs general ability, while the cloze
score can.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from onpolicy_core.data.benchmarks import subsample
from onpolicy_core.data.io import InputError, iter_jsonl
from onpolicy_core.data.sources import MAX_EXAMPLES_PER_REASON, SourceError

FILES = {"arc_easy": "arc_easy/test.jsonl", "arc_challenge": "arc_challenge/test.jsonl", "mmlu_stem": "mmlu_stem/test.jsonl"}
"""Each set's file under the data root (config.GeneralBenchmark names the same sets)."""


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    choices: list[str]
    answer: int


@dataclass
class ChoiceSet:
    """The usable questions of one file and the skipped rows, counted per reason."""

    questions: list[Question] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    """The first few 'file:line: reason' messages per reason."""

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES_PER_REASON:
            shown.append(f"{where}: {reason}")


def context(question: Question) -> str:
    return f"Question: {question.question}\nAnswer:"


def continuations(question: Question) -> list[str]:
    """lm-eval's target delimiter: a space between 'Answer:' and the choice."""
    return [f" {c}" for c in question.choices]


def _check(obj: object) -> str | None:
    """The skip reason of a row, or None when it is usable."""
    if not isinstance(obj, dict):
        return "not_an_object"
    if not isinstance(obj.get("question"), str) or not obj["question"].strip():
        return "missing_question"
    choices = obj.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        return "missing_choices"
    if len(choices) < 2:
        return "fewer_than_two_choices"
    answer = obj.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool):
        return "missing_answer"
    if not 0 <= answer < len(choices):
        return "answer_out_of_range"
    return None


def load_choice_set(name: str, data_root: str | Path, limit: int | None, limit_order: str, seed: int) -> ChoiceSet:
    """The questions of set `name` (at most `limit`: the first ones or a seeded sample, in file order,
    as eval.limit_order) with the skip counts of the whole file."""
    if name not in FILES:
        raise SourceError(f"unknown multiple-choice set {name!r}; known: {sorted(FILES)}")
    path = Path(data_root) / FILES[name]
    if not path.is_file():
        raise SourceError(f"{path}: file of general-ability set {name!r} not found (set general.data_root)")
    result = ChoiceSet()
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if isinstance(obj, InputError):
            result.skip("not_utf8" if "not UTF-8" in str(obj) else "invalid_json", where)
            continue
        reason = _check(obj)
        if reason:
            result.skip(reason, where)
            continue
        qid = obj.get("id")
        # Texts as given, as lm-eval reads them (acc_norm divides by the choice's own length).
        result.questions.append(Question(str(qid) if qid not in (None, "") else f"{name}-{lineno}", obj["question"],
                                         list(obj["choices"]), obj["answer"]))
    if not result.questions:
        raise SourceError(f"{path}: no usable question ({dict(result.skipped)} skipped)")
    result.questions = subsample(result.questions, limit, seed, limit_order)
    return result
