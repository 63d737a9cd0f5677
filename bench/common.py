"""What every bench shares: the real data and model, machine facts, and the measuring protocol.

Protocol (docs/performance.md): each variant runs in its own process (its peak RSS is its own), is
warmed up on the same inputs first, and is timed as the median of `--reps` (>= 5) repetitions on
identical inputs; where memory is compared, a second process measures it (`run_variant`). Machine
facts say what the hardware allows: threads and the measured matmul rate, so a throughput can be
read as a fraction of the compute bound.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GSM8K_TRAIN = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gsm8k(path: Path) -> list:
    """The GSM8K problems of `path`, read as the gsm8k benchmark of the registry reads them."""
    from onpolicy_core.data.registry import BENCHMARKS
    from onpolicy_core.data.sources import load_source

    return load_source(str(path), "gsm8k", BENCHMARKS["gsm8k"].fields, max_chars=10**6).problems


def model_dir() -> Path:
    """The embedded model, materialised by `make repro` (artifacts/model) or here into a temp folder."""
    materialised = ROOT / "artifacts" / "model"
    if (materialised / "config.json").exists():
        return materialised
    from onpolicy_core.plumbing.config import default_params
    from onpolicy_core.stages.model import run_model

    out = Path(tempfile.mkdtemp()) / "model"
    p = default_params([f"paths.model={out}", "tracking.enabled=false"])
    run_model(p.model, p.paths, p.tracking)
    return out


def matmul_gflops(dtype_name: str = "float32", size: int = 2048, reps: int = 5) -> float:
    """Measured dense matmul rate (GFLOP/s) at `size`^2 with torch's threads: the compute ceiling."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def machine_facts() -> dict:
    """CPU, cores, torch threads and measured fp32/bf16 matmul GFLOP/s (printed by every bench)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "matmul_fp32_gflops": round(matmul_gflops("float32"), 1), "matmul_bf16_gflops": round(matmul_gflops("bfloat16"), 1)}


def print_facts(facts: dict) -> None:
    print(f"machine: {facts['cpu']}, {facts['cores']} cores, torch {facts['torch']} with {facts['torch_threads']} threads; "
          f"matmul 2048^2: fp32 {facts['matmul_fp32_gflops']} GFLOP/s, bf16 {facts['matmul_bf16_gflops']} GFLOP/s", flush=True)


def median_time(fn: Callable[[], object], reps: int, warmup: Callable[[], object] | None = None) -> dict:
    """Warm up (`warmup`, else one call of `fn`), then time `reps` calls of `fn` on identical inputs:
    median and every wall time, median CPU time of this process (all threads), and the last result."""
    (warmup or fn)()
    walls, cpus, result = [], [], None
    for _ in range(reps):
        cpu, start = time.process_time(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return {"seconds": statistics.median(walls), "times": [round(t, 3) for t in walls],
            "cpu_seconds": statistics.median(cpus), "result": result}


def run_worker(script: str, spec: dict, env: dict | None = None) -> dict:
    """Run one variant as `python script --worker '<spec json>'` in a fresh process; its last stdout
    `RESULT` line is its JSON result. A failing variant stops the bench with its stderr tail."""
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"error: variant {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if not lines:
        sys.exit(f"error: variant {spec} printed no result line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len(RESULT):])


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
"""glibc with a fixed 1 MB mmap threshold: freed blocks go back to the OS, so peak RSS follows live
memory. With the default (dynamic) threshold the same call's peak varied by 130 MB between runs."""


def run_variant(script: str, spec: dict, env: dict | None = None) -> dict:
    """A variant twice, each in its own process: timed (`spec["reps"]`) with the default allocator,
    then one repetition under MEMORY_ENV (slower, not timed) for its peak memory."""
    timed = run_worker(script, spec, env)
    measured = run_worker(script, {**spec, "reps": 1}, {**(env or {}), **MEMORY_ENV})
    return {**timed, "peak_mb": measured["peak_mb"], "above_model_mb": measured["above_model_mb"],
            "peak_mb_default_allocator": timed["peak_mb"]}


RESULT = "RESULT "
"""Prefix of a worker's result line (libraries such as vLLM print to stdout too)."""


def emit(result: dict) -> None:
    """A worker's result, as the one line `run_worker` reads back."""
    print(RESULT + json.dumps(result), flush=True)


def save_results(name: str, payload: dict) -> Path:
    """Write a bench's results to docs/results/perf/<name>.json (docs/performance.md is built from them)."""
    out = ROOT / "docs" / "results" / "perf" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    return out
