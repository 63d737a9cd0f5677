"""TRL `SFTTrainer` with the token-weighted loss family of `onpolicy_core.losses` (nll, dft, eaft, idft).

Only `compute_loss` changes: it reads TRL's fused LM head outputs (per-token `log_probs`, `entropy`,
`label_mask`, computed in tiles without the logits), weights each token, and records the IDFT
diagnostics of the official trainer (lambda; mean/std/min/max/median of phi and gamma; their 10-bin
histograms over [-3 beta, 3 beta] and [gamma_min, gamma_max]). Everything else (data collation,
optimisation, checkpointing, resume) is TRL's and transformers'.
"""

from __future__ import annotations

import time

import torch
from trl import SFTTrainer

from onpolicy_core.losses import IDFTParams, histogram_shares, idft_gamma, idft_lambda, summary_stats, token_weights, weighted_nll

TOKEN_METHODS = ("sft", "dft", "eaft", "idft")
_LOSS_OF_METHOD = {"sft": "nll", "dft": "dft", "eaft": "eaft", "idft": "idft"}


class TokenWeightedSFTTrainer(SFTTrainer):
    """SFT whose per-token loss is -w_t log p_t with a detached weight chosen by `method`."""

    def __init__(self, *args, method: str, idft: IDFTParams | None = None, idft_warmup_ratio: float = 0.2,
                 idft_transition_ratio: float = 0.1, **kwargs):
        if method not in TOKEN_METHODS:
            raise ValueError(f"method must be one of {TOKEN_METHODS}, got {method!r}")
        super().__init__(*args, **kwargs)
        self.method = method
        self.idft = idft or IDFTParams()
        self.idft_warmup_ratio = idft_warmup_ratio
        self.idft_transition_ratio = idft_transition_ratio
        self._last_log = (time.perf_counter(), 0)

    def idft_lambda_now(self) -> float:
        """lambda at the current optimizer step. `state.global_step` is restored on resume, so the
        schedule continues where it stopped (the official trainer restarts it)."""
        total = self.state.max_steps
        progress = self.state.global_step / total if total and total > 0 else 1.0
        return idft_lambda(progress, self.idft_warmup_ratio, self.idft_transition_ratio)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        mask = outputs.label_mask
        lam = self.idft_lambda_now() if self.method == "idft" else 1.0
        weights = token_weights(_LOSS_OF_METHOD[self.method], outputs.log_probs, outputs.entropy, lam=lam,
                                idft=self.idft, vocab_size=self.model.config.get_text_config().vocab_size)
        loss = weighted_nll(outputs.log_probs, weights, mask, num_items_in_batch)
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
