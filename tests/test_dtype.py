"""model.dtype is the one dtype setting: under bfloat16 (the paper preset) every stage that decodes
loads the policy in bf16, on HF and in the vLLM engine, while scoring and training keep float32
weights by design (score.precision and train.common.precision set their compute; see
plumbing.models.TRAINING_DTYPE). The realign stage's HF path: tests/test_realign_stage.py."""

from __future__ import annotations

import json

import pytest

from onpolicy_core.data.arithmetic import generate
from onpolicy_core.data.io import write_jsonl
from onpolicy_core.plumbing import models
from onpolicy_core.stages import skeleton
from tests.conftest import default_config


@pytest.fixture
def loaded_dtypes(monkeypatch):
    """The dtype of every model a stage loads through the shared skeleton, in order (the real loader)."""
    seen: list[str] = []

    def recording(*args, **kwargs):
        model, tokenizer = models.load_materialised(*args, **kwargs)
        seen.append(str(model.dtype).removeprefix("torch."))
        return model, tokenizer

    monkeypatch.setattr(skeleton, "load_materialised", recording)
    return seen


def _bf16_overrides(tmp_path, model_dir) -> list[str]:
    """Writes tiny data splits; the overrides of a bf16 project over them and the embedded model."""
    data = tmp_path / "data"
    write_jsonl(data / "eval.jsonl", (p.to_dict() for p in generate(2, 1, 2, 9, seed=7)))
    write_jsonl(data / "train.jsonl", (p.to_dict() for p in generate(2, 1, 2, 9, seed=8)))
    return ["model.dtype=bfloat16", f"paths.model={model_dir}", f"paths.policy={model_dir}", f"paths.data={data}",
            f"paths.eval={tmp_path / 'eval'}", f"paths.general={tmp_path / 'general'}", f"paths.score={tmp_path / 'score'}",
            f"paths.train={tmp_path / 'train'}", "tracking.enabled=false"]


def test_hf_stages_decode_in_model_dtype_and_scoring_keeps_float32(tmp_path, embedded_model_dir, loaded_dtypes):
    from onpolicy_core.stages.eval import run_eval
    from onpolicy_core.stages.general import run_general
    from onpolicy_core.stages.score import run_score

    arc = tmp_path / "mc" / "arc_easy"
    arc.mkdir(parents=True)
    (arc / "test.jsonl").write_text(json.dumps({"id": "q1", "question": "What do plants need to grow?", "choices": ["light", "stone"],
                                                "answer": 0}) + "\n")
    p = default_config(*_bf16_overrides(tmp_path, embedded_model_dir), "eval.backend=hf", "eval.benchmarks=[arithmetic]", "eval.limit=2",
                       "eval.max_new_tokens=4", "general.benchmarks=[arc_easy]", f"general.data_root={tmp_path / 'mc'}", "general.limit=1")
    run_eval(p.eval, p.paths, p.tracking, p.model, p.data, "base")
    run_general(p.general, p.paths, p.tracking, p.model, "base")
    run_score(p.score, p.paths, p.tracking, tmp_path / "data" / "train.jsonl", tmp_path / "score" / "original")
    assert loaded_dtypes == ["bfloat16", "bfloat16", "float32"], "eval and general in model.dtype; DDT scoring in float32 weights"


ENGINE_DTYPES = """
import json, sys
from pathlib import Path
from onpolicy_core.decoding import generation, hinted_vllm
from onpolicy_core.plumbing.config import default_params
from onpolicy_core.stages.eval import run_eval
from onpolicy_core.stages.realign import run_realign

engines, real = [], generation.make_vllm_engine

def recording(*args, **kwargs):
    llm = real(*args, **kwargs)
    engines.append(str(llm.llm_engine.model_config.dtype))
    return llm

generation.make_vllm_engine = hinted_vllm.make_vllm_engine = recording
overrides, data, out = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
p = default_params(overrides)
summary = run_realign(p.realign, p.paths, p.tracking, p.model, "hinted", data / "train.jsonl", out)
run_eval(p.eval, p.paths, p.tracking, p.model, p.data, "base")
print(json.dumps({"engines": engines, "summary_dtype": summary["dtype"]}))
"""


def test_the_vllm_engine_runs_in_model_dtype(tmp_path, embedded_model_dir):
    """Hinted Decoding on vLLM (the issue: it ran in fp32 under the bf16 paper preset) and vLLM
    evaluation, in a fresh process as each stage runs (vLLM's in-process engine keeps process-wide
    state that a later engine of a long test session would inherit)."""
    import subprocess
    import sys

    pytest.importorskip("vllm")
    if not models.bf16_native():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX), which vLLM on CPU needs for a bf16 engine")
    overrides = [*_bf16_overrides(tmp_path, embedded_model_dir), "realign.backend=vllm", "realign.decoding.max_new_tokens=4",
                 "realign.decoding.greedy=true", "eval.backend=vllm", "eval.benchmarks=[arithmetic]", "eval.limit=2", "eval.max_new_tokens=4"]
    done = subprocess.run([sys.executable, "-c", ENGINE_DTYPES, json.dumps(overrides), str(tmp_path / "data"), str(tmp_path / "realign")],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"engines": ["torch.bfloat16", "torch.bfloat16"], "summary_dtype": "bfloat16"}
