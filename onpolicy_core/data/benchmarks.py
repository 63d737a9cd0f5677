"""Read the problems of a benchmark of the registry (`registry.BENCHMARKS`).

File benchmarks are read from `eval.data_root`
(the project's `../shared/data` layout: the Qwen2.5-Math evaluation files plus GSM8K), or from the
Hugging Face hub when the file is absent and `eval.allow_hub` is on. Prompting and grading are the
same for every benchmark (`prompts.render_prompt`, math-verify via `grading.grade`), as in the
Qwen2.5-Math toolkit's `qwen-boxed` setting that the DFT and IDFT papers evaluate with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from onpolicy_core.algorithms.options import BenchmarkFile
from onpolicy_core.data import arithmetic
from onpolicy_core.data.io import read_problems
from onpolicy_core.data.records import Problem
from onpolicy_core.data.registry import (
    BENCHMARKS,
    GENERATED_OOD,
    HELD_OUT,
    VALIDATION,
)
from onpolicy_core.data.sources import LoadResult, SourceError, load_source


@dataclass(frozen=True)
class Generator:
    """Settings of the built-in arithmetic generator (the data stage's, for the OOD benchmark)."""

    min_steps: int
    max_steps: int
    max_operand: int


@dataclass(frozen=True)
class BenchmarkSource:
    """Where benchmarks are read from and how many problems each gets (plain values, no config)."""

    data_root: str
    """Folder of the benchmark files."""
    allow_hub: bool
    """Read a benchmark from the hub when its file is absent."""
    limit: int | None
    """Problems per benchmark; None: all."""
    limit_order: str
    """'random' (a seeded sample, kept in file order) or 'first' (the first `limit` in file order)."""
    seed: int
    """Seed of the subsample and of the OOD generator."""
    held_out: Path
    """The data stage's eval split (val.jsonl sits beside it)."""
    ood_extra_steps: int
    """arithmetic_ood: up to this many more operations than the training generator; 0: its own numbers
    of operations, so that only the numbers shift."""
    ood_operand_scale: int
    """arithmetic_ood: numbers up to this many times the training generator's."""
    custom: dict[str, BenchmarkFile]
    """Benchmarks declared in params.yaml, beside the built-in registry."""


def subsample(problems: list[Problem], limit: int | None, seed: int, order: str = "random") -> list[Problem]:
    """`limit` problems in file order: the first ones, or a seeded sample (the whole set when limit is None)."""
    if limit is None or limit >= len(problems):
        return problems
    if order == "first":
        return problems[:limit]
    keep = set(random.Random(seed).sample(range(len(problems)), limit))
    return [p for i, p in enumerate(problems) if i in keep]


def load_benchmark(name: str, where: BenchmarkSource, train_generator: Generator) -> tuple[list[Problem], LoadResult | None]:
    """The problems of benchmark `name` (at most `where.limit`) and, for file benchmarks, the load
    report with counted skips."""
    if name in where.custom:
        spec = where.custom[name]
        loaded = load_source(spec.path, spec.format, spec.fields, max_chars=1_000_000,
                             question_template=spec.question_template, answer_normalization=spec.answer_normalization)
        return subsample(loaded.problems, where.limit, where.seed, where.limit_order), loaded
    if name not in BENCHMARKS:
        raise SourceError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)} and eval.custom_benchmarks {sorted(where.custom)}")
    bench = BENCHMARKS[name]
    if bench.kind in (HELD_OUT, VALIDATION):
        split = where.held_out if bench.kind == HELD_OUT else where.held_out.with_name("val.jsonl")
        if not split.exists():
            raise SourceError(f"{split}: the data stage's {bench.kind} split is missing (run `onpolicy data`)")
        problems = read_problems(split)
        if not problems:
            raise SourceError(f"{split}: the {bench.kind} split is empty (data.n_eval / data.n_val = 0?)")
        return subsample(problems, where.limit, where.seed, where.limit_order), None
    if bench.kind == GENERATED_OOD:
        # Harder than training (more steps, larger numbers), with a seed far from the training one:
        # the OOD problems are new, not harder copies. No extra steps: the training's own chain lengths.
        g, extra = train_generator, where.ood_extra_steps
        low, high = (g.max_steps + 1, g.max_steps + extra) if extra else (g.min_steps, g.max_steps)
        return arithmetic.generate(where.limit or 100, low, high,
                                   g.max_operand * where.ood_operand_scale, seed=where.seed + 1_000_003,
                                   prefix=name), None
    path = Path(where.data_root) / bench.file
    if path.exists():
        source, hub_config, split = str(path), None, "test"
    elif where.allow_hub and bench.hub:
        source, hub_config, split = bench.hub, bench.hub_config, bench.hub_split
    else:
        hint = f" or set eval.allow_hub=true to read {bench.hub}" if bench.hub else ""
        raise SourceError(f"{path}: benchmark file {name!r} not found (set eval.data_root{hint})")
    loaded = load_source(source, bench.format, bench.fields, max_chars=1_000_000, hf_config=hub_config, hf_split=split)
    return subsample(loaded.problems, where.limit, where.seed, where.limit_order), loaded
