"""Data-parallel training, run rather than only configured: `accelerate launch --num_processes 2` of
the project's train command on CPU (gloo, DDP) for a few steps. Both ranks end with the same
weights, rank 0 alone writes the model and it loads. (FSDP, infra/accelerate/fsdp.yaml, needs GPUs.)"""

from __future__ import annotations

import json
import subprocess

import pytest

from onpolicy_core.data.arithmetic import generate
from onpolicy_core.data.io import write_jsonl
from tests.conftest import BIN, ROOT, bin_env

pytestmark = pytest.mark.service


def test_accelerate_launch_two_cpu_processes_trains_one_model(tmp_path, embedded_model_dir):
    write_jsonl(tmp_path / "data" / "train.jsonl", (p.to_dict() for p in generate(16, 2, 2, 9, seed=3)))
    settings = [f"paths.model={embedded_model_dir}", f"paths.policy={embedded_model_dir}", f"paths.data={tmp_path / 'data'}", f"paths.train={tmp_path / 'train'}",
                "tracking.enabled=false", "train.common.max_steps=3", "train.common.batch_size=2", "train.common.max_length=96",
                "train.common.save_steps=1000", "train.common.log_model=false"]
    # The run reads its learning rate from the tune stage's choice (params.yaml fixes SFT's by hand, so no model is needed;
    # it lands in ./artifacts/tune of the run's folder).
    tuned = subprocess.run([str(BIN / "onpolicy"), "tune", "--method", "sft", "--params", str(ROOT / "params.yaml"),
                            *[a for s in settings for a in ("--set", s)]], cwd=tmp_path, env=bin_env(), capture_output=True, text=True)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    # accelerate 1.15 starts several CPU processes only through MPI (`--cpu`), which is not installed here;
    # its torchrun launcher (`--multi_gpu`) starts them without it, and with no GPU the ranks join over gloo.
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "onpolicy_core.cli", "train", "--run", "sft-original",
           "--params", str(ROOT / "params.yaml"), *[a for s in settings for a in ("--set", s)]]
    done = subprocess.run(cmd, cwd=tmp_path, env=bin_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    out = tmp_path / "train" / "sft-original"
    summary = json.loads((out / "summary.json").read_text())
    ddp = summary["data_parallel"]
    assert ddp["processes"] == 2 and ddp["ranks_agree"], ddp
    assert summary["steps"] == 3
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    assert checksum == pytest.approx(ddp["weight_checksums"][0], rel=1e-6), "the saved model is the trained one"
