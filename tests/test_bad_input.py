"""Bad input, table-driven: every case ends in exit code 2 with one line on stderr naming the file,
line or key, no traceback, and nothing written. Runs the real CLI in-process (typer's runner).
docs/reliability.md lists these cases with what each gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onpolicy_core.cli import app
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

GOOD = {"id": "a", "question": "1+1?", "solution": "so \\boxed{2}", "answer": "2", "source": "x"}


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _source(tmp: Path, name: str, content) -> list[str]:
    path = tmp / "in" / name
    if content == "folder":
        path.mkdir(parents=True)
    elif content is not None:
        _write(path, content)
    return ["data", "--set", f"data.source={path}", "--set", "data.format=fields"]


def _params_file(tmp: Path, text: str) -> list[str]:
    return ["data", "--params", str(_write(tmp / "bad.yaml", text))]


# name -> (build(tmp) -> argv, env, expected fragment of the error line (with {tmp} filled in))
CASES = {
    # settings
    "params file missing": (lambda t: ["data", "--params", str(t / "none.yaml")], {}, "none.yaml: params file not found"),
    "params YAML syntax error": (lambda t: _params_file(t, "data:\n  n_eval: [1,\n"), {}, "bad.yaml:3: not valid YAML"),
    "params top level not a mapping": (lambda t: _params_file(t, "- 1\n"), {}, "top level must be a mapping"),
    "override without =": (lambda t: ["data", "--set", "data.n_eval"], {}, "must look like section.key=value"),
    "override malformed YAML": (lambda t: ["data", "--set", "eval.benchmarks=[gsm8k,"], {}, "eval.benchmarks=[gsm8k,': the value is not valid YAML"),
    "unknown key": (lambda t: ["data", "--set", "data.n_evl=3"], {}, "data: unknown key(s) ['n_evl']"),
    "wrong type": (lambda t: ["data", "--set", "score.temperature=hot"], {}, "score.temperature: expected float"),
    "null where not allowed": (lambda t: ["data", "--set", "data.n_eval=null"], {}, "data.n_eval: null is not allowed"),
    "closed choice": (lambda t: ["data", "--set", "realign.mixing.hinted.lambda_mode=cosine"], {}, "realign.mixing.hinted.lambda_mode: must be one of"),
    "unknown backend": (lambda t: ["data", "--set", "eval.backend=tgi"], {}, "eval.backend: must be one of"),
    "unknown benchmark": (lambda t: ["data", "--set", "eval.benchmarks=[olympiad]"], {}, "eval.benchmarks: unknown ['olympiad']"),
    "negative epochs": (lambda t: ["data", "--set", "train.common.epochs=-1"], {}, "train.common.epochs must be > 0"),
    "zero save_steps": (lambda t: ["data", "--set", "train.common.save_steps=0"], {}, "save_steps, save_total_limit and logging_steps must be >= 1"),
    "zero max_steps": (lambda t: ["data", "--set", "train.common.max_steps=0"], {}, "train.common.max_steps must be -1"),
    "zero histogram bins": (lambda t: ["data", "--set", "score.histogram_bins=0"], {}, "score.histogram_bins must be >= 1"),
    "no OOD shift": (lambda t: ["data", "--set", "eval.ood_extra_steps=0", "--set", "eval.ood_operand_scale=1"], {},
                     "is no shift: arithmetic_ood would be in-distribution"),
    "zero eval limit": (lambda t: ["data", "--set", "eval.limit=0"], {}, "eval.limit must be >= 1 or null"),
    "negative n_eval": (lambda t: ["data", "--set", "data.n_eval=-1"], {}, "data.n_eval and data.n_val must be >= 0"),
    "gamma_min zero": (lambda t: ["data", "--set", "train.idft.gamma_min=0"], {}, "train.idft: IDFT needs beta > 0 and 0 < gamma_min"),
    "top_p above 1": (lambda t: ["data", "--set", "realign.decoding.top_p=1.5"], {}, "realign.decoding: temperature must be > 0 and top_p in (0, 1]"),
    "one preference sample": (lambda t: ["data", "--set", "train.preference.samples_per_prompt=1"], {}, "samples_per_prompt must be >= 2"),
    "lora dropout 1": (lambda t: ["data", "--set", "train.common.lora.dropout=1.0"], {}, "train.common.lora needs r, alpha >= 1 and 0 <= dropout < 1"),
    "connect timeout 0": (lambda t: ["data", "--set", "tracking.connect_timeout_s=0"], {}, "tracking needs connect_timeout_s > 0"),
    "vLLM realign over 2 GPUs": (lambda t: ["data", "--set", "realign.vllm.tensor_parallel_size=2"], {}, "realign.vllm.tensor_parallel_size must be 1"),
    "self_distill with beta": (lambda t: ["data", "--set", "realign.mixing.self_distill.beta=0.5"], {}, "self_distill must be lambda_mode linear with beta 0"),
    "avg@k without samples": (lambda t: ["data", "--set", "report.metric=avg@k"], {}, "report.metric 'avg@k' needs eval.samples > 0"),
    "arithmetic format mismatch": (lambda t: ["data", "--set", "data.format=gsm8k"], {}, "data.source 'arithmetic' goes with data.format 'arithmetic'"),
    # the data stage's input
    "source file missing": (lambda t: _source(t, "none.jsonl", None), {}, "none.jsonl: source file not found"),
    "source is a folder": (lambda t: _source(t, "x.jsonl", "folder"), {}, "x.jsonl: is a folder, not a .jsonl or .parquet file"),
    "corrupt parquet": (lambda t: _source(t, "x.parquet", b"PAR1 not really"), {}, "x.parquet: not a readable Parquet file"),
    "unsupported file type": (lambda t: _source(t, "x.csv", "a,b\n"), {}, "x.csv: unsupported file type '.csv'"),
    "no usable row": (lambda t: _source(t, "x.jsonl", '{"question": "q"}\n{broken\n'), {}, "x.jsonl: no usable records"),
    "n_eval takes everything": (lambda t: _source(t, "x.jsonl", json.dumps({"question": "q", "solution": "s", "answer": "1"}) + "\n"),
                                {}, "leaves no training data"),
    "unreachable hub dataset": (lambda t: ["data", "--set", "data.source=hf:nobody/no-such-set", "--set", "data.format=fields"],
                                {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, "hf:nobody/no-such-set: cannot load split 'train'"),
    # the other stages' input
    "unknown realign variant": (lambda t: ["realign", "--variant", "nosuch"], {}, "--variant must be one of ['self_distill', 'hinted']"),
    "realign input missing": (lambda t: ["realign", "--input", str(t / "none.jsonl")], {}, "none.jsonl: file not found"),
    "realign input is a folder": (lambda t: ["realign", "--input", str((t / "dir.jsonl").mkdir() or t / "dir.jsonl")], {},
                                  "dir.jsonl: is a folder, not a JSONL file"),
    "realign record without answer": (lambda t: ["realign", "--input", str(_jsonl(t / "r.jsonl", [GOOD, {k: v for k, v in GOOD.items() if k != "answer"}]))],
                                      {}, "r.jsonl:2: record lacks string field(s) ['answer']"),
    "realign broken JSON line": (lambda t: ["realign", "--input", str(_write(t / "r.jsonl", json.dumps(GOOD) + "\n{oops\n"))], {},
                                 "r.jsonl:2: invalid JSON"),
    "score input missing": (lambda t: ["score", "--input", str(t / "none.jsonl"), "--output", str(t / "out")], {}, "none.jsonl: file not found"),
    "score record without solution": (lambda t: ["score", "--input", str(_jsonl(t / "s.jsonl", [{"id": "a", "question": "q"}])),
                                                 "--output", str(t / "out")], {}, "s.jsonl:1: record lacks string field(s) ['solution']"),
    "score input not UTF-8": (lambda t: ["score", "--input", str(_write(t / "s.jsonl", b'{"id": "caf\xe9"}\n')), "--output", str(t / "out")],
                              {}, "s.jsonl:1: not UTF-8"),
    "unknown train run": (lambda t: ["train", "--run", "nope-original"], {}, "train run 'nope-original' must be <method>-<data>"),
    "unknown train data": (lambda t: ["train", "--run", "sft-elsewhere"], {}, "train run 'sft-elsewhere' must be <method>-<data>"),
    "training set missing": (lambda t: ["train", "--run", "sft-hinted"], {}, "realign/hinted/train.jsonl: file not found"),
    "eval of an untrained run": (lambda t: ["eval", "--model", "dft-original"], {}, "no model for 'dft-original'; run `dvc repro train@dft-original`"),
    "eval of an unknown name": (lambda t: ["eval", "--model", "whatever"], {}, "train run 'whatever' must be <method>-<data>"),
    "model folder missing": (lambda t: ["model", "--set", f"model.source={t}/missing-folder"], {}, "missing-folder: local model folder not found"),
    "model folder without config": (lambda t: ["model", "--set", f"model.source={(t / 'empty').mkdir() or t / 'empty'}"], {},
                                    "empty: folder has no config.json"),
    "gguf file missing": (lambda t: ["model", "--set", f"model.source={t}/m.gguf"], {}, "m.gguf: GGUF file not found"),
    "hub model offline": (lambda t: ["model", "--set", "model.source=nobody/no-such-model"], {"HF_HUB_OFFLINE": "1"},
                          "nobody/no-such-model: not in the local Hugging Face cache and the hub is unreachable"),
    "report before evaluation": (lambda t: ["report"], {}, "no evaluation for"),
    "unknown preset": (lambda t: ["preset", "nosuch", "--params", str(_write(t / "p.yaml", (ROOT / "params.yaml").read_text()))], {},
                       "presets/nosuch.yaml: no such preset"),
}


def _common(tmp: Path) -> list[str]:
    """Every output under tmp/out, tracking off: a case that wrote anything shows there."""
    out = tmp / "out"
    return ["--set", "tracking.enabled=false", *[a for k in ("model", "data", "score", "realign", "train", "eval", "report")
                                                 for a in ("--set", f"paths.{k}={out}/{k}")]]


IN_A_PROCESS = {"unreachable hub dataset"}
"""Run as a real process: `datasets` binds its log handlers to the stderr of the first in-process run."""



def _invoke(case: str, argv: list[str], env: dict) -> tuple[int, str]:
    if case in IN_A_PROCESS:
        done = subprocess.run([sys.executable, "-m", "onpolicy_core.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=300)
        return done.returncode, done.stderr
    result = CliRunner().invoke(app, argv, env=env)
    assert isinstance(result.exception, SystemExit) or result.exception is None, result.exception
    return result.exit_code, result.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, monkeypatch):
    build, env, expected = CASES[case]
    monkeypatch.chdir(ROOT)  # presets/ and params.yaml as a user has them
    argv = build(tmp_path)
    if argv[0] != "preset":
        argv = argv + _common(tmp_path) if "--params" not in argv else argv
    code, stderr = _invoke(case, argv, env)
    assert code == 2, (code, stderr[-2000:])
    lines = [line for line in stderr.splitlines() if line.strip() and "WARNING" not in line and " INFO " not in line]
    assert lines and lines[-1].startswith("error: "), stderr[-2000:]
    assert expected in lines[-1], lines[-1]
    assert "Traceback" not in stderr
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] if (tmp_path / "out").exists() else []
    assert not written, written


def test_a_numeric_zero_is_an_answer(tmp_path):
    from onpolicy_core.algorithms.options import FieldMap
    from onpolicy_core.data.sources import load_source

    path = _jsonl(tmp_path / "z.jsonl", [{"problem": "1-1?", "solution": "so 0", "answer": 0}])
    loaded = load_source(str(path), "math", FieldMap(question="problem", solution="solution", answer="answer", id=None), 4000)
    assert [p.answer for p in loaded.problems] == ["0"] and not loaded.skipped
