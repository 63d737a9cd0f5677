"""The model stage: the embedded GGUF becomes a plain HF folder; other specs resolve as documented."""

import dataclasses
import json

import pytest
import torch

from onpolicy_core.plumbing.models import (
    ModelSourceError,
    load_materialised,
    resolve_source,
)
from tests.conftest import default_config


def test_embedded_model_is_materialised_as_a_plain_hf_folder(embedded_model_dir):
    names = {p.name for p in embedded_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "onpolicy_model.json"} <= names
    provenance = json.loads((embedded_model_dir / "onpolicy_model.json").read_text())
    assert provenance["kind"] == "gguf" and len(provenance["gguf_sha256"]) == 64
    assert "quantization_config" not in json.loads((embedded_model_dir / "config.json").read_text())
    model, tok = load_materialised(embedded_model_dir, dtype="float32")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.rstrip().endswith("assistant")
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1], "the materialised model generates"


def ModelConfig(**fields):
    return dataclasses.replace(default_config().model, **fields)


def test_specs_resolve_to_gguf_local_or_hub(tmp_path, embedded_model_dir):
    assert resolve_source(ModelConfig()).kind == "gguf"
    assert resolve_source(ModelConfig(source=str(embedded_model_dir))).kind == "local"
    hub = resolve_source(ModelConfig(source="Qwen/Qwen2.5-Math-1.5B"))
    assert (hub.kind, hub.location) == ("hub", "Qwen/Qwen2.5-Math-1.5B")
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_source(ModelConfig(source=str(tmp_path)))
    with pytest.raises(ModelSourceError, match="not found"):
        resolve_source(ModelConfig(source="./missing-folder"))
    with pytest.raises(ModelSourceError, match="no materialised model"):
        load_materialised(tmp_path, dtype="float32")
