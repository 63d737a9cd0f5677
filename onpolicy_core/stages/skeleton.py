"""The skeleton the model stages share (score, realign, eval): open the stage's MLflow run, load the
model, map a function over resumable shards, then write and log the results.

Shards are checkpointed outside the output folder (`partial_dir`) under a fingerprint of everything the results
depend on (config, inputs, model content), so a killed stage resumes, but only into work made under
the same settings; the shards are cleared once the stage has written its outputs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from onpolicy_core.config import TrackingConfig
from onpolicy_core.io import ShardedResults, write_json
from onpolicy_core.models import load_materialised, model_identity
from onpolicy_core.tracking import StageRun, stage_run

T = TypeVar("T")


@dataclass
class ModelStage:
    run: StageRun
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
                inputs: Sequence[str | Path], run_name: str, parent_run_id: str | None = None, load_model: bool = True,
                dtype: str = "float32") -> Iterator[ModelStage]:
    """Open the stage run, load the model (or only its tokenizer) and the shards of `out`."""
    with stage_run(stage, config, tracking, run_name=run_name, parent_run_id=parent_run_id, inputs=list(inputs)) as run:
        if load_model:
            model, tokenizer = load_materialised(model_dir, dtype=dtype, device="auto")
        else:
            from transformers import AutoTokenizer

            model, tokenizer = None, AutoTokenizer.from_pretrained(model_dir)
        shards = ShardedResults(partial_dir(Path(out)), {**fingerprint, "model": model_identity(model_dir)})
        yield ModelStage(run, model, tokenizer, shards)
        shards.clear()


def map_shards(shards: ShardedResults | None, items: Sequence[T], shard_size: int, fn: Callable[[Sequence[T]], list[dict]],
               on_resumed: Callable[[int], None] | None = None) -> list[dict]:
    """fn over `items` in shards of `shard_size`, in order; shards already done are read back (and
    `on_resumed` told how many items they held) instead of computed again. No `shards`: no checkpoints."""
    rows: list[dict] = []
    for index, start in enumerate(range(0, len(items), shard_size)):
        chunk = items[start : start + shard_size]
        if shards is None:
            rows.extend(fn(chunk))
            continue
        if shards.done(index):
            rows.extend(shards.read(index))
            if on_resumed is not None:
                on_resumed(len(chunk))
            continue
        new = fn(chunk)
        shards.write(index, new)
        rows.extend(new)
    return rows


def run_record_path(out: Path) -> Path:
    """Where a stage records what one execution was (artifacts/eval/base -> artifacts/.runs/eval/base.json):
    wall time, throughput, MLflow run ids, the checkpoint it resumed from. These differ between two
    runs of the same inputs, so they stay out of DVC's outputs and out of the folders other stages
    read (the report depends on artifacts/eval and artifacts/score whole)."""
    out = Path(out)
    return out.parent.with_name(".runs") / out.parent.name / f"{out.name}.json"


def write_run_record(out: Path, record: dict) -> None:
    write_json(run_record_path(out), record)


def read_run_record(out: Path) -> dict:
    path = run_record_path(out)
    return json.loads(path.read_text()) if path.is_file() else {}


def publish(run: StageRun, metrics_file: Path, metrics: dict, artifacts: Sequence[Path] = (),
            logged: dict[str, float] | None = None) -> None:
    """Write metrics.json (a DVC metric), log the metrics (`logged`, else `metrics`) and artifacts."""
    write_json(metrics_file, metrics)
    run.log_metrics(logged if logged is not None else metrics)
    for path in artifacts:
        run.log_artifact(path)
