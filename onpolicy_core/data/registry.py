"""The benchmark registry: a plain dict from name to where the problems live and how they are read.

Adding a benchmark is one entry in `BENCHMARKS`. The registry is data only (the config validates
`eval.benchmarks` against it); `benchmarks.load_benchmark` reads the problems.
"""

from __future__ import annotations

from dataclasses import dataclass

from onpolicy_core.algorithms.options import DataFormat, FieldMap

HELD_OUT = "held_out"
"""Kind of the arithmetic in-distribution benchmark: the data stage's eval split."""
VALIDATION = "validation"
"""Kind of the arithmetic validation benchmark: the data stage's val.jsonl beside eval.jsonl (for
hyperparameter choice; never the benchmarks a method is judged on)."""
GENERATED_OOD = "generated_ood"
"""Kind of the arithmetic out-of-distribution benchmark: the generator, harder than training."""
FILE = "file"


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    kind: str = FILE
    file: str | None = None
    """Path under `eval.data_root`."""
    format: DataFormat = "fields"
    """How the gold answer is read (see `sources.DataFormat`)."""
    fields: FieldMap | None = None
    hub: str | None = None
    """'hf:<dataset id>' with the same columns, used when the file is absent and hub access is allowed."""
    hub_config: str | None = None
    hub_split: str = "test"


BENCHMARKS: dict[str, Benchmark] = {
    "arithmetic": Benchmark("arithmetic", "held-out split of the training distribution (data stage eval.jsonl)", kind=HELD_OUT),
    "arithmetic_val": Benchmark("arithmetic_val", "validation split carved from the training pool (data stage val.jsonl)",
                                kind=VALIDATION),
    "arithmetic_ood": Benchmark("arithmetic_ood", "generated arithmetic with more steps and larger numbers than training", kind=GENERATED_OOD),
    "gsm8k": Benchmark(
        "gsm8k", "GSM8K test (1319 grade-school word problems)", file="gsm8k/test.jsonl", format="gsm8k",
        fields=FieldMap(question="question", solution="answer", answer=None, id=None), hub="hf:openai/gsm8k", hub_config="main",
    ),
    "math500": Benchmark(
        "math500", "MATH-500 (PRM800K subset of MATH)", file="math500/test.jsonl", format="math",
        fields=FieldMap(question="problem", solution="solution", answer="answer", id="unique_id"), hub="hf:HuggingFaceH4/MATH-500",
    ),
    "aime24": Benchmark(
        "aime24", "AIME 2024 (30 problems, integer answers)", file="aime24/test.jsonl", format="math",
        fields=FieldMap(question="problem", solution="solution", answer="answer", id="id"), hub="hf:HuggingFaceH4/aime_2024", hub_split="train",
    ),
    "amc23": Benchmark(
        "amc23", "AMC 2023 (40 problems, numeric answers; no solutions)", file="amc23/test.jsonl", format="fields",
        fields=FieldMap(question="problem", solution=None, answer="answer", id="id"),
    ),
    "minerva": Benchmark(
        "minerva", "Minerva Math / OCW (272 problems; gold is the last \\boxed{} of the solution)", file="minerva_math/test.jsonl",
        format="math", fields=FieldMap(question="problem", solution="solution", answer=None, id="idx"),
    ),
}
