"""The one record format every stage reads and writes (one JSON object per line).

| field    | meaning                                                                 |
|----------|-------------------------------------------------------------------------|
| id       | stable example id, unique within a split (e.g. 'gsm8k-train-00017')     |
| question | the problem statement, as shown to the model                            |
| solution | a reference solution ending in the final answer in \\boxed{...}          |
| answer   | the gold final answer (LaTeX or plain text), graded with math-verify    |
| source   | where it came from (file path, hub id or 'arithmetic')                  |

Stages may add fields (e.g. `realigned` by Hinted Decoding); these five are always present.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

REQUIRED_FIELDS = ("id", "question", "solution", "answer", "source")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    solution: str
    answer: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> Problem:
        missing = [k for k in REQUIRED_FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"record lacks string field(s) {missing}")
        return cls(**{k: row[k] for k in REQUIRED_FIELDS})
