"""Stage `model`: materialise the configured model once as a plain Hugging Face folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from onpolicy_core.data.io import atomic_dir, file_sha256
from onpolicy_core.plumbing.config import (
    ModelConfig,
    PathsConfig,
    TrackingConfig,
    to_dict,
)
from onpolicy_core.plumbing.models import load_source, resolve_source, save_folder
from onpolicy_core.plumbing.tracking import stage_run

log = logging.getLogger(__name__)


def run_model(cfg: ModelConfig, paths: PathsConfig, tracking: TrackingConfig) -> Path:
    """Load `cfg.source` and write it to `paths.model` (atomically: a killed run leaves no folder)."""
    source = resolve_source(cfg)
    out = Path(paths.model)
    with stage_run("model", {"model": to_dict(cfg), "paths": to_dict(paths)}, tracking) as run:
        start = time.perf_counter()
        log.info("loading %s (%s)", source.location, source.kind)
        model, tokenizer = load_source(cfg)
        provenance = {
            "source": cfg.source,
            "kind": source.kind,
            "location": source.location if source.kind != "gguf" else Path(source.location).name,
            "revision": cfg.revision,
            "dtype": cfg.dtype,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        if source.kind == "gguf":
            provenance["gguf_sha256"] = file_sha256(source.location)
        with atomic_dir(out) as tmp:
            save_folder(model, tokenizer, tmp, provenance)
        seconds = time.perf_counter() - start
        run.log_metrics({"parameters": provenance["parameters"], "materialise_seconds": seconds})
        run.log_dict(provenance, "provenance.json")
        run.set_tags({"model.architecture": provenance["architecture"]})
        log.info("wrote %s (%d parameters) in %.1fs", out, provenance["parameters"], seconds)
    return out
