"""Per-GPU throughput of the project's HF Hinted Decoding (`hinted.hinted_generate`) and of plain HF
`generate` (the eval path), for the extrapolation in docs/scale.md. The models are the shapes of
SmolLM2-135M and Qwen2.5-1.5B with random weights (no weights travel to the GPU machine): speed
depends on the shapes, not the values. The repetition guard is off and EOS never ends a row early, so
every row decodes `--new-tokens` tokens.

    PYTHONPATH=. python3 bench/gpu_throughput.py --out results.json    # on a GPU machine (torch + transformers)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {
    "smollm2-135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def build(name: str, dtype: torch.dtype, device: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    shape = dict(SHAPES[name])
    arch = shape.pop("arch")
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(**shape, max_position_embeddings=4096, eos_token_id=0, pad_token_id=0, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config)
    return model.to(dtype).eval()


def timed(fn) -> float:
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    from onpolicy_core.algorithms.hinted import hinted_generate
    from onpolicy_core.algorithms.options import DecodeOptions, MixingOptions

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=160, help="plain prompt; the hinted one adds a 200-token reference")
    ap.add_argument("--out", default="gpu_throughput.json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    facts = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "dtype": str(dtype)}
    opts = DecodeOptions(temperature=0.3, top_p=0.95, greedy=False, max_new_tokens=args.new_tokens, answer_marker=None, marker_scope="rest",
                         repetition_window=10, repetition_count=10**9)
    mixing = MixingOptions(beta=0.5, lambda_mode="linear", sigmoid_center=0.5, piecewise_bounds=(0.3, 0.7))
    results = []
    for name in args.models:
        model = build(name, dtype, device)
        vocab = model.config.vocab_size
        for batch in args.batches:
            g = torch.Generator().manual_seed(batch)
            plain = [torch.randint(2, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(batch)]
            hinted = [torch.randint(2, vocab, (200,), generator=g).tolist() + p for p in plain]

            def hd():
                hinted_generate(model, hinted, plain, opts, mixing, [], lambda ids: "", pad_token_id=0, seeds=list(range(batch)))

            def gen():
                ids = torch.tensor(plain, device=device)
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=True, temperature=1.0, top_k=0, pad_token_id=0)

            for label, fn in (("hinted_decoding_hf", hd), ("generate_hf", gen)):
                fn() if batch == args.batches[0] else None  # warm-up once per model
                seconds = min(timed(fn) for _ in range(2))
                row = {"model": name, "what": label, "batch": batch, "new_tokens": args.new_tokens, "seconds": round(seconds, 2),
                       "tokens_per_s": round(batch * args.new_tokens / seconds, 1),
                       "examples_per_s": round(batch / seconds, 3)}
                results.append(row)
                print(json.dumps(row), flush=True)
        model = None  # free it before the next shape
        torch.cuda.empty_cache() if device == "cuda" else None
    with open(args.out, "w") as fh:
        json.dump({"machine": facts, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
