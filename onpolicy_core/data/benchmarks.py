"""The benchmark registry: a plain dict from name to where the problems live and how they are read.

Adding a benchmark is one entry in `BENCHMARKS`. File benchmarks are read from `eval.data_root`
(the project's `../shared/data` layout: the Qwen2.5-Math evaluation files plus GSM8K), or from the
Hugging Face hub when the file is absent and `eval.allow_hub` is on. Prompting and grading are the
same for every benchmark (`prompts.render_prompt`, math-verify via `grading.grade`), as in the
Qwen2.5-Math toolkit's `qwen-boxed` setting that the DFT and IDFT papers evaluate with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from onpolicy_core.config import ArithmeticConfig, DataConfig, EvalConfig, FieldMap
from onpolicy_core.data import arithmetic
from onpolicy_core.data.sources import LoadResult, SourceError, load_source
from onpolicy_core.io import read_jsonl
from onpolicy_core.records import Problem

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
    format: str = "fields"
    """How the gold answer is read (see `DataConfig.format`)."""
    fields: FieldMap = field(default_factory=FieldMap)
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
        fields=FieldMap(question="question", solution="answer", answer=None), hub="hf:openai/gsm8k", hub_config="main",
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


def ood_settings(train: ArithmeticConfig, cfg: EvalConfig) -> ArithmeticConfig:
    """The out-of-distribution generator: `ood_extra_steps` more operations and numbers
    `ood_operand_scale` times larger than the training generator."""
    return ArithmeticConfig(
        n=cfg.limit or 100,
        min_steps=train.max_steps + 1,
        max_steps=train.max_steps + cfg.ood_extra_steps,
        max_operand=train.max_operand * cfg.ood_operand_scale,
    )


def _subsample(problems: list[Problem], limit: int | None, seed: int) -> list[Problem]:
    """A seeded sample of `limit` problems, kept in file order (the whole set when limit is None)."""
    if limit is None or limit >= len(problems):
        return problems
    keep = set(random.Random(seed).sample(range(len(problems)), limit))
    return [p for i, p in enumerate(problems) if i in keep]


def load_benchmark(name: str, cfg: EvalConfig, held_out: Path, train_generator: ArithmeticConfig) -> tuple[list[Problem], LoadResult | None]:
    """The problems of benchmark `name` (at most `cfg.limit`) and, for file benchmarks, the load
    report with counted skips. `held_out` is the data stage's eval split."""
    if name not in BENCHMARKS:
        raise SourceError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    if bench.kind in (HELD_OUT, VALIDATION):
        split = held_out if bench.kind == HELD_OUT else held_out.with_name("val.jsonl")
        if not split.exists():
            raise SourceError(f"{split}: the data stage's {bench.kind} split is missing (run `onpolicy data`)")
        problems = [Problem.from_dict(r) for r in read_jsonl(split)]
        if not problems:
            raise SourceError(f"{split}: the {bench.kind} split is empty (data.n_eval / data.n_val = 0?)")
        return _subsample(problems, cfg.limit, cfg.seed), None
    if bench.kind == GENERATED_OOD:
        a = ood_settings(train_generator, cfg)
        # A seed far from the training one: the OOD problems are new, not harder copies.
        return arithmetic.generate(a.n, a.min_steps, a.max_steps, a.max_operand, seed=cfg.seed + 1_000_003, prefix=name), None
    path = Path(cfg.data_root) / bench.file
    if path.exists():
        source, hub_config, split = str(path), None, "test"
    elif cfg.allow_hub and bench.hub:
        source, hub_config, split = bench.hub, bench.hub_config, bench.hub_split
    else:
        hint = f" or set eval.allow_hub=true to read {bench.hub}" if bench.hub else ""
        raise SourceError(f"{path}: benchmark file {name!r} not found (set eval.data_root{hint})")
    data_cfg = DataConfig(source=source, format=bench.format, fields=bench.fields, hf_config=hub_config, hf_split=split,
                          max_chars=1_000_000)
    loaded = load_source(source, data_cfg)
    return _subsample(loaded.problems, cfg.limit, cfg.seed), loaded
