"""The skeleton the model stages share (score, realign, eval): open the stage's MLflow run, load the
model, map a function over resumable work units, then write and log the results.

Work units are checkpointed outside the output folder (`partial_dir`) under a fingerprint of everything
the results depend on (config, inputs, model content), so a killed stage resumes, but only into work
made under the same settings; the units are cleared once the stage has written its outputs.

A stage runs in one of three ways (docs/scale.md):
  whole   every unit, then the outputs (the default; `workers: 1`)
  shard   `--shard I --num-shards N`: a contiguous run of units into the shared work folder, no outputs,
          no MLflow run (the merge logs the stage)
  merge   `--merge`: no model; every unit's rows read back in order and the outputs written from them,
          so N shards give exactly the bytes of one whole run
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from onpolicy_core.data.io import ShardedResults, write_json
from onpolicy_core.plumbing.config import TrackingConfig
from onpolicy_core.plumbing.models import load_materialised, model_identity
from onpolicy_core.plumbing.tracking import StageRun, stage_run

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based): a contiguous run of a stage's work units, the same for any
    worker, so no rebalancing is ever needed."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"--shard must be in 0..{self.count - 1} for --num-shards {self.count}, got {self.index}")

    def units(self, total: int) -> range:
        return range(self.index * total // self.count, (self.index + 1) * total // self.count)

    @property
    def label(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


def n_units(n_items: int, unit_size: int) -> int:
    return math.ceil(n_items / unit_size)


@dataclass
class ModelStage:
    run: StageRun | None
    """The stage's MLflow run (None in a shard worker: the merge logs the stage)."""
    model: Any
    """The loaded model (None when the stage was opened with load_model=False)."""
    tokenizer: Any
    shards: ShardedResults


def partial_dir(out: Path) -> Path:
    """Where a stage's shards live while it runs: beside the folder that holds its output, never
    inside it (artifacts/eval/base -> artifacts/.eval.partial/base), since other stages read that
    folder whole (the report reads artifacts/eval and artifacts/score)."""
    out = Path(out)
    return out.parent.with_name(f".{out.parent.name}.partial") / out.name


@contextlib.contextmanager
def model_stage(stage: str, config: dict, tracking: TrackingConfig, *, out: Path, model_dir: str | Path, fingerprint: dict,
                inputs: Sequence[str | Path], run_name: str, dtype: str, parent_run_id: str | None = None,
                load_model: bool = True, shard: Shard | None = None, merge: bool = False) -> Iterator[ModelStage]:
    """Open the stage run (not in a shard worker), load the model (or only its tokenizer: always
    when merging) in `dtype` (each stage names its own: no default here) and the work units of `out`;
    the units are cleared after a whole run or a merge."""
    opened = (contextlib.nullcontext(None) if shard is not None else
              stage_run(stage, config, tracking, run_name=run_name, parent_run_id=parent_run_id, inputs=list(inputs)))
    with opened as run:
        if load_model and not merge:
            model, tokenizer = load_materialised(model_dir, dtype=dtype, device="auto")
        else:
            from transformers import AutoTokenizer

            model, tokenizer = None, AutoTokenizer.from_pretrained(model_dir)
        shards = ShardedResults(partial_dir(Path(out)), {**fingerprint, "model": model_identity(model_dir)})
        yield ModelStage(run, model, tokenizer, shards)
        if shard is None:
            shards.clear()


def map_units(shards: ShardedResults | None, items: Sequence[T], unit_size: int, fn: Callable[[Sequence[T]], list[dict]],
              on_resumed: Callable[[int], None] | None = None, units: range | None = None) -> list[dict]:
    """fn over `items` in work units of `unit_size`, in order (only the units in `units`, if given);
    units already done are read back (and `on_resumed` told how many items they held) instead of
    computed again. A computed unit is also read back from its file, so a whole run returns exactly
    the rows a merge reads. No `shards`: no checkpoints."""
    rows: list[dict] = []
    for index in units if units is not None else range(n_units(len(items), unit_size)):
        chunk = items[index * unit_size : (index + 1) * unit_size]
        if shards is None:
            rows.extend(fn(chunk))
            continue
        if shards.done(index):
            if on_resumed is not None:
                on_resumed(len(chunk))
        else:
            shards.write(index, fn(chunk))
        rows.extend(shards.read(index))
    return rows


@dataclass
class UnitsDone:
    """What `run_units` did in a whole run or a merge: every unit's rows, in order, and what they cost."""

    rows: list[dict]
    seconds: float
    """This process's seconds (a merge's are only the reading back)."""
    tokens_made: int
    """Tokens of the units computed now, here or by the shards (units read back from a killed run cost nothing now)."""
    shards: dict[str, dict]
    """The shard workers' run records (a merge), else {}."""

    def timing(self) -> dict[str, float]:
        """One timing for every sharded stage: its seconds, its shards' (a merge), and tokens per second
        of the work done now (by the shards, for a merge)."""
        shards = shard_timing(self.shards)
        busy = shards.get("shard_seconds_total", self.seconds)
        speed = {"tokens_per_second": round(self.tokens_made / busy, 1)} if self.tokens_made and busy else {}
        return {"seconds": round(self.seconds, 1), **shards, **speed}

    def record(self, run: StageRun, **extra: Any) -> dict:
        """The stage's run record: timing, its MLflow run and the shards' own records."""
        return self.timing() | {"mlflow_run_id": run.run_id, "shards": self.shards} | extra


def run_units(stage: ModelStage, out: Path, total: int, compute: Callable[[range], list[dict]], *,
              shard: Shard | None = None, merge: bool = False) -> UnitsDone | None:
    """The whole / shard / merge branch every sharded stage shares. `compute(units)` returns the rows
    of those work units through `stage.shards` (computing only the units not yet done). A shard worker
    computes its units, writes its run record and returns None: it writes no outputs. A merge reads
    every unit back; a whole run computes them all. The stage writes its outputs from `.rows`, so N
    shards give the bytes of one run. Each row counts its tokens in `n_tokens`."""
    start = time.perf_counter()
    if merge:
        rows = stage.shards.collect(total)
        shards = take_shard_records(out)
        return UnitsDone(rows, time.perf_counter() - start, sum(r.get("tokens_made", 0) for r in shards.values()), shards)
    mine = shard.units(total) if shard is not None else range(total)
    fresh = [u for u in mine if not stage.shards.done(u)]
    rows = compute(mine)
    made = sum(row["n_tokens"] for u in fresh for row in stage.shards.read(u))
    seconds = time.perf_counter() - start
    if shard is not None:
        write_run_record(out, {"seconds": round(seconds, 1), "units": [mine.start, mine.stop],
                               "units_resumed": len(mine) - len(fresh), "tokens_made": made}, shard)
        return None
    return UnitsDone(rows, seconds, made, {})


def run_record_path(out: Path) -> Path:
    """Where a stage records what one execution was (artifacts/eval/base -> artifacts/.runs/eval/base.json):
    wall time, throughput, MLflow run ids, the checkpoint it resumed from. These differ between two
    runs of the same inputs, so they stay out of DVC's outputs and out of the folders other stages
    read (the report depends on artifacts/eval and artifacts/score whole)."""
    out = Path(out)
    return out.parent.with_name(".runs") / out.parent.name / f"{out.name}.json"


def process_cost() -> dict:
    """What this stage's process has cost so far: wall seconds since it started (model loading
    included) and CPU seconds, its own and its finished children's; on GPUs also how many it saw.
    Each stage is one `onpolicy <stage>` process, so this is the stage's cost (the report's cost table)."""
    import resource
    import sys

    import psutil

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cost = {"process_seconds": round(time.time() - psutil.Process().create_time(), 1),
            "cpu_seconds": round(own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime, 1)}
    torch = sys.modules.get("torch")  # only where the stage loaded it: the report and data stages do not
    if torch is not None and torch.cuda.is_available():
        cost["gpus"] = torch.cuda.device_count()
    return cost


def write_run_record(out: Path, record: dict, shard: Shard | None = None) -> None:
    """The run record of `out`, or of one shard of it (<name>.shard-I-of-N.json beside it), with the
    process's cost (`process_cost`)."""
    path = run_record_path(out)
    write_json(path.with_name(f"{path.stem}.{shard.label}.json") if shard else path, process_cost() | record)


def take_shard_records(out: Path) -> dict[str, dict]:
    """The run records the shard workers of `out` wrote, by shard label; removed once read, so the
    next merge never counts the shards of an earlier run."""
    path = run_record_path(out)
    records = {}
    for file in sorted(path.parent.glob(f"{path.stem}.shard-*-of-*.json")):
        records[file.stem.removeprefix(f"{path.stem}.")] = json.loads(file.read_text())
        file.unlink()
    return records


def shard_timing(records: dict[str, dict]) -> dict[str, float]:
    """What a merge logs of its shards: how many ran, the slowest and the total worker seconds."""
    if not records:
        return {}
    seconds = [r.get("seconds", 0.0) for r in records.values()]
    return {"shards": len(records), "shard_seconds_max": max(seconds), "shard_seconds_total": round(sum(seconds), 1)}


def read_run_record(out: Path) -> dict:
    path = run_record_path(out)
    return json.loads(path.read_text()) if path.is_file() else {}


def publish(run: StageRun, metrics_file: Path, metrics: dict, artifacts: Sequence[Path] = (),
            logged: dict[str, float] | None = None) -> None:
    """Write metrics.json (a DVC metric), log the metrics (`logged`, else `metrics`) and artifacts."""
    assert run is not None, "a shard worker writes no outputs"
    write_json(metrics_file, metrics)
    run.log_metrics(logged if logged is not None else metrics)
    for path in artifacts:
        run.log_artifact(path)
