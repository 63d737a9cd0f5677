"""The train stage on TRL with a tiny model: every method lowers its loss, outputs are a plain HF
folder, diagnostics are logged, and a killed run resumes at the same step and lambda."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from onpolicy_core.data.arithmetic import generate
from onpolicy_core.data.io import write_json, write_jsonl
from onpolicy_core.stages import train as train_stage
from onpolicy_core.training.preference import build_pairs
from onpolicy_core.training.sft import TokenWeightedSFTTrainer
from tests.conftest import default_config, make_tiny_model

BASE = default_config()
OFF = dataclasses.replace(BASE.tracking, enabled=False)

N = 6


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory, tokenizer):
    """A tiny random Llama with the embedded tokenizer, saved as the project's model, plus data."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(vocab_size=len(tokenizer), seed=0)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(root / "data" / "train.jsonl", (p.to_dict() for p in generate(N, 1, 2, 9, seed=4)))
    return root


@torch.no_grad()
def _completion_nll(model, paths) -> float:
    from onpolicy_core.algorithms.ddt import score_batch
    from onpolicy_core.algorithms.prompts import encode_pair, render_prompt
    from onpolicy_core.data.io import read_jsonl
    from onpolicy_core.plumbing.models import load_materialised

    _, tok = load_materialised(paths.model, dtype="float32")
    pairs = [encode_pair(tok, render_prompt(tok, r["question"]), r["solution"] + tok.eos_token)
             for r in read_jsonl(f"{paths.data}/train.jsonl")]
    scores = score_batch(model.eval(), [a for a, _ in pairs], [b for _, b in pairs])
    return -float(torch.cat([s.logp for s in scores]).mean())


def _paths(root, tmp_path):
    return dataclasses.replace(BASE.paths, model=str(root / "model"), policy=str(root / "model"), data=str(root / "data"), train=str(tmp_path / "train"),
                               tune=str(tmp_path / "tune"))


def _train(cfg, paths, tracking, run, learning_rate=3e-3):
    """run_train at `learning_rate`, fixed by hand through the tune stage's best.json (no model)."""
    from onpolicy_core.stages.tune import fixed_choice

    method = run.split("-")[0]
    write_json(f"{paths.tune}/{method}/best.json", fixed_choice(method, learning_rate))
    return train_stage.run_train(cfg, paths, tracking, run)


def _cfg(idft=None, **common):
    """Train settings of params.yaml with a tiny, fast common block (and IDFT options if given)."""
    t = BASE.train
    base = dict(max_steps=4, batch_size=N, lr_scheduler="constant", save_steps=2, log_model=False)
    return dataclasses.replace(t, common=dataclasses.replace(t.common, **{**base, **common}), idft=idft or t.idft,
                               eaft=dataclasses.replace(t.eaft, top_k=5),
                               preference=dataclasses.replace(t.preference, samples_per_prompt=2, max_new_tokens=8))


@pytest.mark.parametrize("method", ["sft", "dft", "eaft", "eaft_full", "idft", "dpo", "simpo"])
def test_every_method_lowers_its_training_loss(method, tiny_project, tmp_path):
    paths = _paths(tiny_project, tmp_path)
    before = AutoModelForCausalLM.from_pretrained(paths.model)
    summary = _train(_cfg(), paths, OFF, f"{method}-original")
    losses = summary["loss_history"]
    out = tmp_path / "train" / f"{method}-original"
    after = AutoModelForCausalLM.from_pretrained(out / "model")
    assert len(losses) == 4
    if method in ("dpo", "simpo"):
        assert losses[-1] < losses[0], losses  # one full batch per step: the same pairs every step
    else:
        # The weighted losses are not monotone in fit (-p log p grows with p below 1/e), so judge
        # every SFT-family method by what they all reduce: the NLL of the training completions.
        assert _completion_nll(after, paths) < _completion_nll(before, paths)
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters())), "parameters changed"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert not (tmp_path / "train" / ".checkpoints" / f"{method}-original").exists(), "checkpoints cleaned after success"
    if method in ("dpo", "simpo"):
        assert summary["pairs"] == sum(summary["pair_outcomes"].get(k, 0) for k in ("pair_correct_sample", "pair_reference_chosen"))
        assert summary["sampler"] == "hf"


def test_preference_pairs_sampled_on_vllm_train_the_embedded_model(tiny_project, tmp_path, embedded_model_dir):
    """train.preference.backend vllm: the candidates come from an engine over the policy folder, which
    is closed before the trainer starts on the same weights."""
    pytest.importorskip("vllm")
    paths = dataclasses.replace(_paths(tiny_project, tmp_path), model=str(embedded_model_dir), policy=str(embedded_model_dir))
    cfg = _cfg(max_steps=1, batch_size=2)
    cfg = dataclasses.replace(cfg, preference=dataclasses.replace(cfg.preference, backend="vllm", max_new_tokens=16))
    summary = _train(cfg, paths, OFF, "dpo-original", learning_rate=1e-5)
    assert summary["sampler"] == "vllm" and summary["steps"] == 1
    assert summary["pairs"] >= 1 and sum(summary["pair_outcomes"].values()) == N, summary["pair_outcomes"]
    assert (tmp_path / "train" / "dpo-original" / "model" / "model.safetensors").is_file()


def test_idft_logs_diagnostics_to_mlflow(tiny_project, tmp_path):
    import mlflow

    _train(_cfg(max_steps=3), _paths(tiny_project, tmp_path), dataclasses.replace(BASE.tracking, experiment="train-diag"), "idft-original")
    client = mlflow.MlflowClient()
    run = mlflow.search_runs(experiment_names=["train-diag"]).iloc[0]
    history = {m.key: m for m in client.get_metric_history(run["run_id"], "idft/lambda")}
    assert history, "lambda logged per step"
    metrics = run.filter(like="metrics.").index
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "idft/phi_median", "idft/gamma_std",
                "idft/phi_bin_9_ratio", "idft/gamma_bin_0_ratio"):
        assert f"metrics.{key}" in metrics, key
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"diagnostics.png", "summary.json", "config.json"} <= artifacts
    assert (run["params.learning_rate"], run["params.learning_rate_source"]) == ("0.003", "fixed"), "the rate and where it came from"
    summary = json.loads((tmp_path / "train" / "idft-original" / "summary.json").read_text())
    assert (summary["learning_rate"], summary["learning_rate_source"]) == (3e-3, "fixed")
    png = (tmp_path / "train" / "idft-original" / "diagnostics.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    assert int.from_bytes(png[16:20], "big") <= 900, "narrow enough for the `dvc plots show` page (no cut right edge)"


def test_killed_training_resumes_at_the_same_step_and_lambda(tiny_project, tmp_path, monkeypatch):
    cfg = _cfg(max_steps=6, save_steps=2, idft=dataclasses.replace(BASE.train.idft, warmup_ratio=0.2, transition_ratio=0.5))
    paths = _paths(tiny_project, tmp_path / "a")
    straight = _train(cfg, paths, OFF, "idft-original")

    lambdas = []
    real_step = TokenWeightedSFTTrainer.training_step

    def dies_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 3 and "killed" not in lambdas:
            lambdas.append("killed")
            raise KeyboardInterrupt("killed")
        lambdas.append((self.state.global_step, self.idft_lambda_now()))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(TokenWeightedSFTTrainer, "training_step", dies_at_step_3)
    paths = _paths(tiny_project, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, paths, OFF, "idft-original")
    assert not (tmp_path / "b" / "train" / "idft-original" / "model").exists()
    resumed = _train(cfg, paths, OFF, "idft-original")
    assert resumed["resumed_from"].endswith("checkpoint-2")
    after_resume = [x for x in lambdas[lambdas.index("killed") + 1 :]]
    assert after_resume[0] == (2, pytest.approx((2 / 6 - 0.2) / 0.5)), "step counter and lambda schedule continue"
    assert resumed["loss_history"] == pytest.approx(straight["loss_history"], rel=1e-4)  # history restored + continued
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-4), "the whole run's loss, not the resumed part's"
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "train" / "idft-original" / "model")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "train" / "idft-original" / "model")
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_preference_pairs_follow_the_dft_recipe():
    samples = [["a1", "a2", "a3"], ["b1", "b2"], ["c1", "c2"], ["d1", "d2"]]
    correct = [[False, True, False], [True, True], [False, False], [False, False]]
    pairs, counts = build_pairs(samples, correct, ["ra", "rb", "rc", ""], "reference")
    assert [(p.index, p.chosen, p.rejected, p.chosen_is_reference) for p in pairs] == [(0, "a2", "a1", False), (2, "rc", "c1", True)]
    assert counts == {"pair_correct_sample": 1, "skipped_all_correct": 1, "pair_reference_chosen": 1, "skipped_no_correct": 1}
    pairs, counts = build_pairs(samples, correct, ["ra", "rb", "rc", "rd"], "skip")
    assert len(pairs) == 1 and counts["skipped_no_correct"] == 2


def test_checkpoints_made_under_other_settings_are_not_resumed(tiny_project, tmp_path, monkeypatch, caplog):
    paths = _paths(tiny_project, tmp_path)
    real_step = TokenWeightedSFTTrainer.training_step

    def dies_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(TokenWeightedSFTTrainer, "training_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt), caplog.at_level("INFO", logger="onpolicy_core.stages.train"):
        _train(_cfg(max_steps=6, save_steps=2), paths, OFF, "sft-original")
    assert "discarding" not in caplog.text, "a first run has nothing to discard"
    caplog.clear()
    monkeypatch.setattr(TokenWeightedSFTTrainer, "training_step", real_step)
    with caplog.at_level("INFO", logger="onpolicy_core.stages.train"):
        other = _train(_cfg(max_steps=6, save_steps=2, seed=7), paths, OFF, "sft-original", learning_rate=1e-2)
    assert other["resumed_from"] is None and other["steps"] == 6
    assert "made under other config; starting fresh" in caplog.text


def test_a_trained_model_is_identified_by_its_content(tiny_project, tmp_path):
    from onpolicy_core.plumbing.models import model_identity, weights_sha256

    paths = _paths(tiny_project, tmp_path)
    _train(_cfg(max_steps=1), paths, OFF, "sft-original")
    folder = tmp_path / "train" / "sft-original" / "model"
    first = model_identity(folder)
    assert json.loads(first)["weights_sha256"] == weights_sha256(folder)
    _train(_cfg(max_steps=1, seed=3), paths, OFF, "sft-original", learning_rate=1e-2)
    assert model_identity(folder) != first, "a retrained model at the same path is another model to eval's resume"


@pytest.mark.parametrize("method", ["sft", "idft"])
def test_full_and_fused_lm_heads_give_the_same_loss_and_gradient(method):
    """`train.common.lm_head` picks a speed/memory trade-off, never a different loss."""
    from trl.trainer.utils import add_fused_lm_head

    from onpolicy_core.algorithms.losses import token_loss, token_weights
    from onpolicy_core.training.sft import _logit_outputs

    model = make_tiny_model(vocab_size=64, seed=3)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, 64, (3, 12), generator=gen)
    labels = input_ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[2, 9:] = -100  # a shorter row
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    idft = BASE.train.idft

    def loss_and_grad(outputs):
        w = token_weights(method, outputs.log_probs, outputs.entropy, lam=1.0, idft=idft, vocab_size=64)
        loss = token_loss(method, outputs.log_probs, w, outputs.label_mask, None)
        model.zero_grad()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    full = loss_and_grad(_logit_outputs(model, dict(inputs), None))
    fused = loss_and_grad(model(**inputs, use_cache=False, fused_lm_head=True))
    torch.testing.assert_close(full[0], fused[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(full[1], fused[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
