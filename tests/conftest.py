"""Shared fixtures: the real shared data, a tiny random model, and the embedded model materialised
once per session by the real `model` stage; and the test tiers.

Tiers (markers, set here from what a test uses, so none is forgotten):
  unit     no model, no server: the math, the config, the graph (`pytest -m unit`, under a minute)
  model    loads the embedded SmolLM2-135M model (its fixtures)
  service  starts servers or runs the DVC / Prefect pipeline (its fixtures, or the module's own mark)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from onpolicy_core.plumbing.config import set_dotted

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


MODEL_FIXTURES = {"embedded_model_dir", "tokenizer"}
SERVICE_FIXTURES = {"project", "prefect_backend"}
TIERS = ("unit", "model", "service")


def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(t) for t in TIERS):
            continue
        used = set(getattr(item, "fixturenames", ()))
        tier = "service" if used & SERVICE_FIXTURES else "model" if used & MODEL_FIXTURES else "unit"
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """The CLI (run in-process by typer's CliRunner) points the root logger at the runner's stderr,
    which closes after the invocation: put back the handlers that were there, so later tests in this
    process log safely (a closed stream left on the root logger sends Prefect's API log handler into
    a recursion of logging errors)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True, scope="session")
def _isolated_tracking(tmp_path_factory):
    """Every test logs to a throwaway MLflow SQLite store, never to the project's mlflow.db."""
    store = tmp_path_factory.mktemp("mlflow")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "gsm8k" / "test.jsonl").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def embedded_model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct, materialised by the real model stage (about 25 s)."""
    from onpolicy_core.stages.model import run_model

    out = tmp_path_factory.mktemp("model") / "model"
    p = default_config(f"paths.model={out}", "tracking.enabled=false")
    run_model(p.model, p.paths, p.tracking)
    return out


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def make_tiny_model(vocab_size: int = 128, seed: int = 0, layers: int = 2):
    """A random Llama with a few small layers: fast, but a real transformers model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


BIN = Path(sys.executable).parent


def bin_env(**extra: str) -> dict[str, str]:
    """The environment with the project's venv first on PATH (dvc, onpolicy, prefect, mlflow)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def make_project(path: Path, **settings) -> Path:
    """A throwaway git + DVC copy of the project (code, dvc.yaml, prefect.yaml, flows) with a small
    data section and dotted `settings` ({"realign.backend": "hf"}) in params.yaml, committed so stage
    runs carry a git commit."""
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", "prefect.yaml"):
        shutil.copy(ROOT / name, path / name)
    for folder in ("onpolicy_core", "tasks", "flows", "custom_benchmarks"):
        shutil.copytree(ROOT / folder, path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((path / "params.yaml").read_text())
    # A small priming: the stage runs for real (8 problems, 2 steps), in seconds rather than minutes.
    small = {"data.arithmetic.n": 30, "data.n_eval": 5, "model.prime.n": 8, "model.prime.batch_size": 4,
             "model.prime.check_n": 4, "model.prime.check_max_new_tokens": 16}
    for key, value in {**small, **settings}.items():
        set_dotted(params, key, value)
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    (path / ".gitignore").write_text("/artifacts/\nmlflow.db\n")
    env = bin_env()
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=path, check=True, env=env)
    # The project's DVC settings, its cache link type among them: with `dvc init`'s default (copy),
    # every model a test pipeline writes would sit on disk twice.
    shutil.copy(ROOT / ".dvc" / "config", path / ".dvc" / "config")
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "project"]):
        subprocess.run(cmd, cwd=path, check=True, env=env)
    return path


@pytest.fixture
def project(tmp_path):
    """make_project in the test's folder."""
    return make_project(tmp_path)


def arithmetic_corpus(path: Path, n: int, min_steps: int, max_steps: int, max_operand: int, seed: int) -> Path:
    """A JSONL file of `n` built-in arithmetic problems in the record format."""
    from onpolicy_core.data.arithmetic import generate
    from onpolicy_core.data.io import write_jsonl

    write_jsonl(path, (p.to_dict() for p in generate(n, min_steps, max_steps, max_operand, seed=seed)))
    return path


def default_config(*overrides: str):
    """The project's params.yaml as the typed config (the one source of defaults), with overrides."""
    from onpolicy_core.plumbing.config import default_params

    return default_params(list(overrides))


def hinted_options(**fields):
    """(DecodeOptions, MixingOptions) of params.yaml's realign defaults (the hinted variant's mixing),
    with fields of either replaced by name."""
    import dataclasses

    from onpolicy_core.algorithms.options import DecodeOptions, MixingOptions

    realign = default_config().realign
    mixing_names = {f.name for f in dataclasses.fields(MixingOptions)}
    decode = dataclasses.replace(realign.decoding, **{k: v for k, v in fields.items() if k not in mixing_names})
    mixing = dataclasses.replace(realign.mixing.hinted, **{k: v for k, v in fields.items() if k in mixing_names})
    assert isinstance(decode, DecodeOptions)
    return decode, mixing


class KilledOnCall:
    """`real`, except that its `kill_at`-th call raises KeyboardInterrupt (a kill at that point): the
    resume tests' one way to stop a stage midway. `calls` counts every call and `args` keeps each
    call's positional arguments; set `kill_at = None` to let the resumed run through."""

    def __init__(self, real, kill_at: int | None):
        self.real, self.kill_at, self.calls, self.args = real, kill_at, 0, []

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.args.append(args)
        if self.calls == self.kill_at:
            raise KeyboardInterrupt("killed")
        return self.real(*args, **kwargs)

    def reset(self, kill_at: int | None = None) -> None:
        self.kill_at, self.calls, self.args = kill_at, 0, []
