"""Deterministic shards (docs/scale.md): `--shard I --num-shards N` runs of score, realign and eval,
then `--merge`, write exactly the bytes of one whole run, whatever N; a merge with units missing is
one line naming them and writes nothing. In-process here; through Prefect workers: test_scale.py."""

from __future__ import annotations

import dataclasses

import pytest

from onpolicy_core.data.arithmetic import generate
from onpolicy_core.io import UnitsMissing, write_jsonl
from onpolicy_core.stages import eval as eval_stage
from onpolicy_core.stages import realign as realign_stage
from onpolicy_core.stages import score as score_stage
from onpolicy_core.stages.skeleton import Shard, partial_dir, run_record_path
from tests.conftest import arithmetic_corpus, default_config

REALIGN_FILES = ("records.jsonl", "train.jsonl", "summary.json", "metrics.json")
SCORE_FILES = ("scores.parquet", "selected.jsonl", "summary.json", "metrics.json", "phi.png")
EVAL_FILES = ("records.parquet", "summary.json", "metrics.json")


@pytest.fixture
def corpus(tmp_path):
    return arithmetic_corpus(tmp_path / "train.jsonl", 5, 2, 2, 9, seed=11)


def _same_files(a, b, names):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between a whole run and the merged shards"


def _sharded(run, out, count, **kw):
    for index in range(count):
        assert run(out, shard=Shard(index, count), **kw) is None
        assert not (out / "summary.json").exists(), "a shard worker writes no outputs"
    return run(out, merge=True, **kw)


def test_realign_shards_merge_to_the_bytes_of_one_run(tmp_path, corpus, embedded_model_dir):
    p = default_config(f"paths.model={embedded_model_dir}", "tracking.enabled=false", "realign.backend=hf",
                       "realign.decoding.max_new_tokens=16", "realign.batch_size=2", "realign.work_unit=2")

    def run(out, **kw):
        return realign_stage.run_realign(p.realign, p.paths, p.tracking, "hinted", corpus, out, **kw)

    whole = run(tmp_path / "whole")
    for count in (2,):  # N = 3: the eval test
        out = tmp_path / f"n{count}"
        assert _sharded(run, out, count) == whole
        _same_files(tmp_path / "whole", out, REALIGN_FILES)
        assert not partial_dir(out).exists(), "the merge clears the work units"
        record = run_record_path(out).read_text()
        assert f'"shard-{count - 1}-of-{count}"' in record, "the merge records each shard's timing"


def test_score_shards_merge_to_the_bytes_of_one_run(tmp_path, corpus, embedded_model_dir):
    p = default_config(f"paths.model={embedded_model_dir}", "tracking.enabled=false", "score.work_unit=2", "score.select_top_k=2")

    def run(out, **kw):
        return score_stage.run_score(p.score, p.paths, p.tracking, corpus, out, **kw)

    run(tmp_path / "whole" / "original")  # the same folder name: the plot's title names it
    _sharded(run, tmp_path / "n2" / "original", 2)
    _same_files(tmp_path / "whole" / "original", tmp_path / "n2" / "original", SCORE_FILES)


def test_eval_shards_merge_to_the_bytes_of_one_run_and_a_gap_is_named(tmp_path, embedded_model_dir):
    base = default_config()
    paths = dataclasses.replace(base.paths, model=str(embedded_model_dir), data=str(tmp_path / "data"), eval=str(tmp_path / "eval"))
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
    _same_files(tmp_path / "whole" / "base", tmp_path / "n3" / "base", EVAL_FILES)


def test_shard_units_are_contiguous_and_cover_everything():
    for total in (0, 1, 5, 64, 1000):
        for count in (1, 2, 3, 8, 64):
            ranges = [Shard(i, count).units(total) for i in range(count)]
            assert [u for r in ranges for u in r] == list(range(total))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(ValueError, match="--shard must be in 0..1"):
        Shard(2, 2)
