"""Deterministic shards (docs/scale.md), in-process: `--shard I --num-shards N` runs, then `--merge`,
write exactly the bytes of one whole run (eval, N = 3; score, realign and eval with N = 2 through
Prefect workers: test_scale.py); a merge with units missing is one line naming them and writes nothing."""

from __future__ import annotations

import dataclasses

import pytest

from onpolicy_core.data.arithmetic import generate
from onpolicy_core.data.io import UnitsMissing, write_jsonl
from onpolicy_core.stages import eval as eval_stage
from onpolicy_core.stages.skeleton import Shard
from tests.conftest import default_config

EVAL_FILES = ("records.parquet", "summary.json", "metrics.json")


def test_eval_shards_merge_to_the_bytes_of_one_run_and_a_gap_is_named(tmp_path, embedded_model_dir):
    base = default_config()
    paths = dataclasses.replace(base.paths, model=str(embedded_model_dir), policy=str(embedded_model_dir), data=str(tmp_path / "data"), eval=str(tmp_path / "eval"))
    write_jsonl(tmp_path / "data" / "eval.jsonl", (p.to_dict() for p in generate(3, 2, 2, 9, seed=7)))
    cfg = dataclasses.replace(base.eval, benchmarks=["arithmetic", "arithmetic_ood"], limit=3, samples=2, max_new_tokens=12,
                              batch_size=8, backend="hf", work_unit=2)
    off = dataclasses.replace(base.tracking, enabled=False)

    def run(name, **kw):
        return eval_stage.run_eval(cfg, dataclasses.replace(paths, eval=str(tmp_path / name)), off, base.model, base.data, "base", **kw)

    whole = run("whole")
    # 4 units (arithmetic problems 0-1, 2; ood 0-1, 2): shard 0 of 3 holds unit 0, shard 1 unit 1, shard 2 units 2-3
    assert run("n3", shard=Shard(0, 3)) is None
    run("n3", shard=Shard(2, 3))
    with pytest.raises(UnitsMissing, match=r"1 of 4 work units not finished \(unit 1\)"):
        run("n3", merge=True)
    assert not (tmp_path / "n3" / "base" / "records.parquet").exists()
    run("n3", shard=Shard(1, 3))
    assert run("n3", merge=True) == whole
    for name in EVAL_FILES:
        assert (tmp_path / "whole" / "base" / name).read_bytes() == (tmp_path / "n3" / "base" / name).read_bytes(), name
    assert not (tmp_path / ".n3.partial").exists(), "the merge clears the work units"


def test_shard_units_are_contiguous_and_cover_everything():
    for total in (0, 1, 5, 64, 1000):
        for count in (1, 2, 3, 8, 64):
            ranges = [Shard(i, count).units(total) for i in range(count)]
            assert [u for r in ranges for u in r] == list(range(total))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="--shard must be in 0..1"):
        Shard(2, 2)
