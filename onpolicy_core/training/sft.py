"""TRL `SFTTrainer` with the token-weighted loss family of `onpolicy_core.algorithms.losses` (sft, dft, eaft,
eaft_full, idft).

Only `compute_loss` changes: it reads per-token `log_probs`, `entropy` and `label_mask`, from the
full logits (`lm_head: full`, and always for EAFT's top-K entropy) or from TRL's fused LM head (tiles,
no full logits), weights each token, and records the IDFT
diagnostics of the official trainer (lambda; mean/std/min/max/median of phi and gamma; their 10-bin
histograms over [-3 beta, 3 beta] and [gamma_min, gamma_max]). Everything else (data collation,
optimisation, checkpointing, resume) is TRL's and transformers'.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import get_args

import torch
from trl import SFTTrainer

from onpolicy_core.algorithms.losses import (
    histogram_shares,
    idft_gamma,
    idft_lambda,
    summary_stats,
    token_loss,
    token_weights,
    topk_entropy,
)
from onpolicy_core.algorithms.options import (
    EAFTOptions,
    IDFTOptions,
    LMHead,
    TokenMethod,
)


def _logit_outputs(model, inputs: dict, top_k: int | None) -> SimpleNamespace:
    """The fused head's per-token fields, from the full logits, plus the top-K entropy when `top_k`
    is given (EAFT needs the K largest logits, which the fused head does not return)."""
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = inputs["labels"][:, 1:].to(logits.device)
    mask = labels != -100
    log_softmax = torch.log_softmax(logits, dim=-1)
    log_probs = log_softmax.gather(-1, labels.clamp(min=0)[..., None])[..., 0].masked_fill(~mask, 0.0)
    with torch.no_grad():
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        is_top1 = logits.argmax(-1) == labels
        top = topk_entropy(logits, top_k) if top_k else None
    return SimpleNamespace(log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=mask, top_k_entropy=top)


class TokenWeightedSFTTrainer(SFTTrainer):
    """SFT whose per-token loss is -w_t log p_t with a detached weight chosen by `method`."""

    def __init__(self, *args, method: TokenMethod, idft: IDFTOptions | None, eaft: EAFTOptions | None,
                 lm_head: LMHead = "full", **kwargs):
        if method not in get_args(TokenMethod):
            raise ValueError(f"method must be one of {get_args(TokenMethod)}, got {method!r}")
        if (method == "idft" and idft is None) or (method == "eaft" and eaft is None):
            raise ValueError(f"method {method!r} needs its options")
        super().__init__(*args, **kwargs)
        self.method, self.idft, self.eaft, self.lm_head = method, idft, eaft, lm_head
        self._last_log = (time.perf_counter(), 0)

    def idft_lambda_now(self) -> float:
        """lambda at the current optimizer step. `state.global_step` is restored on resume, so the
        schedule continues where it stopped (the official trainer restarts it)."""
        total = self.state.max_steps
        progress = self.state.global_step / total if total and total > 0 else 1.0
        return idft_lambda(progress, self.idft.warmup_ratio, self.idft.transition_ratio)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.method == "eaft":
            outputs = _logit_outputs(model, inputs, self.eaft.top_k)
        elif self.lm_head == "full":
            outputs = _logit_outputs(model, inputs, None)
        else:
            outputs = model(**inputs, fused_lm_head=True)
        mask = outputs.label_mask
        lam = self.idft_lambda_now() if self.method == "idft" else 1.0
        weights = token_weights(self.method, outputs.log_probs, outputs.entropy, lam=lam, idft=self.idft,
                                vocab_size=self.model.config.get_text_config().vocab_size,
                                top_k_entropy=getattr(outputs, "top_k_entropy", None),
                                top_k=self.eaft.top_k if self.eaft else None)
        loss = token_loss(self.method, outputs.log_probs, weights, mask, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self._record(mode, outputs, mask, lam, inputs)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record(self, mode: str, outputs, mask: torch.Tensor, lam: float, inputs: dict) -> None:
        valid = mask.bool()
        n = int(valid.sum())
        metrics = self._metrics[mode]
        if n:
            metrics["entropy"].append(float(outputs.entropy[valid].mean()))
            metrics["mean_token_accuracy"].append(float(outputs.is_top1[valid].float().mean()))
        if mode == "train":
            self._total_train_tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(valid.numel())
        metrics["num_tokens"] = [self._total_train_tokens]
        if self.method != "idft" or not n:
            return
        log_p, ent = outputs.log_probs[valid], outputs.entropy[valid]
        phi, gamma = log_p + ent, idft_gamma(log_p, ent, lam, self.idft)
        metrics["idft/lambda"].append(lam)
        for name, values, (lo, hi) in (("phi", phi, (-3 * self.idft.beta, 3 * self.idft.beta)),
                                        ("gamma", gamma, (self.idft.gamma_min, self.idft.gamma_max))):
            for stat, value in summary_stats(values).items():
                metrics[f"idft/{name}_{stat}"].append(value)
            for b, share in enumerate(histogram_shares(values, lo, hi)):
                metrics[f"idft/{name}_bin_{b}_ratio"].append(share)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            now, tokens = time.perf_counter(), self._total_train_tokens
            last_time, last_tokens = self._last_log
            logs["tokens_per_second"] = (tokens - last_tokens) / max(now - last_time, 1e-9)
            self._last_log = (now, tokens)
        super().log(logs, start_time)
