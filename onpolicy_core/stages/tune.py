"""Stage `tune`: the learning rate of one training method, fixed by hand or chosen on the validation split.

A fixed rate (`tune.learning_rates.<key>.rate: <number>`) is written to best.json at once, with no
model. A tuned one (`rate: tuned`) runs an Optuna study with `GridSampler` over its grid (the method's
own `grid`, else `tune.grid`): each trial trains the method as the train stage does (its `training_rows`
/ `make_trainer`, train.common and the method's own block, for `tune.max_steps`) from the tune start
model on the entry's training set (the original set for a `<method>` entry, the named one for
`<method>-<data>`, e.g. idft-hinted: Hinted Decoding data wants its own rate), then scores it greedily
on `tune.val_limit` problems of val.jsonl with eval's generation and grading. The validation split is
carved from the training pool, never trained on and disjoint from every evaluation benchmark, so
choosing the rate does not look at the numbers the report compares. DPO/SimPO sample their preference pairs once per stage, from the start
model, and every trial trains on the same pairs.

The best trial has the highest `tune.metric`; ties go to the higher other accuracy (strict for lenient
and back), then to the lower rate. The study is an SQLite file in a work folder fingerprinted by the
settings and inputs (`claim_work_dir`), so a killed tune continues with the grid points not yet finished
(re-queued with `enqueue_trial`), but only into work made under the same settings; each trial's model and
checkpoints are deleted once it is scored. The start model itself is scored on the same problems
(`start_policy` in best.json, a band in the plot), so a reader sees whether any rate improved on it
within the tuning budget. Every trial is an MLflow run nested under the stage's run
(`optuna_integration.MLflowCallback`, with the trainer's per-step logs), and the stage run carries the
plot, best.json and trials.json.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import time
from pathlib import Path

from onpolicy_core.algorithms.statistics import wilson
from onpolicy_core.data.io import (
    InputError,
    atomic_path,
    claim_work_dir,
    file_sha256,
    read_problems,
    write_json,
)
from onpolicy_core.plumbing.config import (
    TUNED,
    EvalConfig,
    PathsConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    method_params,
    parse_tune_key,
    to_dict,
    training_file,
)
from onpolicy_core.plumbing.models import model_identity
from onpolicy_core.plumbing.tracking import stage_run
from onpolicy_core.stages.skeleton import partial_dir, write_run_record

log = logging.getLogger(__name__)

VALIDATION = "arithmetic_val"
"""The benchmark the trials are scored on: the data stage's val.jsonl."""
OTHER_ACCURACY = {"greedy_accuracy": "strict_greedy_accuracy", "strict_greedy_accuracy": "greedy_accuracy"}
"""The first tie-break of each metric."""


def start_model(paths: PathsConfig) -> Path:
    """The model every trial starts from (and DPO/SimPO sample their pairs from): the starting policy
    (paths.policy, stage prime), as for the train runs (dvc.yaml's tune deps name the same folder)."""
    return Path(paths.policy)


def _interval(successes: int, n: int) -> dict:
    e = wilson(successes, n)
    return {"value": e.value, "low": e.low, "high": e.high, "n": n}


def choose_best(trials: list[dict], metric: str) -> dict:
    """The trial with the highest `metric`, then the higher other accuracy, then the lower rate."""
    other = OTHER_ACCURACY[metric]
    return max(trials, key=lambda t: (t[metric], t[other], -t["learning_rate"]))


def fixed_choice(method: str, rate: float) -> dict:
    """best.json of a rate fixed by hand: the same bytes whatever the grid and tuning settings say."""
    return {"method": method, "learning_rate": rate, "source": "fixed", "metric": None, "objective": None, "trial": None,
            "trials": 0, "grid": None}


def plot_trials(trials: list[dict], path: Path, title: str, metric: str, fixed: float | None = None,
                start: dict | None = None) -> None:
    """Validation accuracy against learning rate (log x) with 95% Wilson error bars, and the start
    model's accuracy as a band; a fixed rate gets a panel that says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if trials:
        rows = sorted(trials, key=lambda t: t["learning_rate"])
        x = [t["learning_rate"] for t in rows]
        ci = [t[f"{metric}_ci"] for t in rows]
        y = [100 * c["value"] for c in ci]
        err = [[100 * (c["value"] - c["low"]) for c in ci], [100 * (c["high"] - c["value"]) for c in ci]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=4)
        best = choose_best(trials, metric)
        if start is not None:
            ax.axhspan(100 * start["low"], 100 * start["high"], color="tab:orange", alpha=0.15, lw=0)
            ax.axhline(100 * start["value"], color="tab:orange", ls=":", label=f"start policy {100 * start['value']:.1f}%")
        ax.axvline(best["learning_rate"], color="grey", ls="--", lw=1, label=f"chosen {best['learning_rate']:g}")
        ax.set(xscale="log", xlabel="learning rate", ylabel=f"validation {metric.replace('_', ' ')} (%)",
               ylim=(-2, 102))
        ax.legend(loc="best")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, f"learning rate fixed by hand: {fixed:g}\n(no trials)", ha="center", va="center", fontsize=12)
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def _write_outputs(out: Path, best: dict, trials: list[dict], metric: str) -> None:
    write_json(out / "best.json", best)
    write_json(out / "trials.json", trials)
    metrics = {"learning_rate": best["learning_rate"], "trials": len(trials)}
    if best["objective"]:
        metrics[f"val_{metric}"] = best["objective"]["value"]
        metrics[f"val_start_{metric}"] = best["start_policy"]["value"]
    write_json(out / "metrics.json", metrics)
    title = f"{best['method']}: {'validation accuracy by learning rate' if trials else 'fixed learning rate'}"
    plot_trials(trials, out / "validation.png", title, metric, fixed=best["learning_rate"], start=best.get("start_policy"))


def _settings(tune: TuneConfig, key: str) -> dict:
    """What the stage reads of `tune` for `key` (its DVC params)."""
    shared = {k: v for k, v in to_dict(tune).items() if k != "learning_rates"}
    return {"rate": tune.learning_rates[key].rate, **shared, "grid": tune.grid_of(key)}


def run_tune(tune: TuneConfig, train: TrainConfig, eval_cfg: EvalConfig, paths: PathsConfig, tracking: TrackingConfig,
             key: str) -> dict:
    """Write <paths.tune>/<key>/{best.json, trials.json, metrics.json, validation.png}; returns best.json."""
    if key not in tune.learning_rates:
        raise InputError(f"tune.learning_rates has no entry for {key!r} (known: {sorted(tune.learning_rates)})")
    out = Path(paths.tune) / key
    rate = tune.learning_rates[key].rate
    if rate != TUNED:
        best = fixed_choice(key, rate)
        _write_outputs(out, best, [], tune.metric)
        log.info("tune %s: fixed by hand at %g", key, rate)
        return best
    return _run_study(tune, train, eval_cfg, paths, tracking, key, out)


def _run_study(tune: TuneConfig, train: TrainConfig, eval_cfg: EvalConfig, paths: PathsConfig, tracking: TrackingConfig,
               key: str, out: Path) -> dict:
    import optuna
    from filelock import FileLock, Timeout
    from optuna.trial import TrialState

    from onpolicy_core.data.benchmarks import BenchmarkSource, Generator, load_benchmark

    method, data = parse_tune_key(key)
    model_dir, grid = start_model(paths), tune.grid_of(key)
    train_file, val_file = training_file(paths, data), Path(paths.data) / "val.jsonl"
    if not Path(train_file).is_file():
        made_by = "data" if data == "original" else f"realign@{data}"
        raise InputError(f"{train_file}: no training set for tune.learning_rates.{key}; run `dvc repro {made_by}` first")
    if tune.max_steps != -1:  # else the run's own length (train.common.max_steps or epochs)
        train = dataclasses.replace(train, common=dataclasses.replace(train.common, max_steps=tune.max_steps))
    block = method_params(method).removeprefix("train.")
    config = {"tune": _settings(tune, key), "method": key, "model_folder": str(model_dir),
              "train": {"common": to_dict(train.common), **({block: to_dict(getattr(train, block))} if block != "common" else {})},
              "eval": {"max_new_tokens": eval_cfg.max_new_tokens, "batch_size": eval_cfg.batch_size}}
    where = BenchmarkSource(data_root=eval_cfg.data_root, allow_hub=False, limit=tune.val_limit, limit_order="random",
                            seed=tune.seed, held_out=Path(paths.data) / "eval.jsonl", ood_extra_steps=1, ood_operand_scale=1, custom={})
    problems, _ = load_benchmark(VALIDATION, where, Generator(min_steps=1, max_steps=1, max_operand=2))  # generator: OOD only, unused here
    greedy = dataclasses.replace(eval_cfg, greedy=True, samples=0)
    work = partial_dir(out)
    fingerprint = {"config": config, "train_sha256": file_sha256(train_file), "val_sha256": file_sha256(val_file),
                   "model": model_identity(model_dir)}
    lock = FileLock(str(work.parent / f".{work.name}.running.lock"))
    work.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise InputError(f"another `onpolicy tune --method {key}` holds {lock.lock_file}") from None
    try:
        changed = claim_work_dir(work, fingerprint)
        if changed:
            log.info("discarding the tuning study in %s: made under other %s; starting fresh", work, ", ".join(changed))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(f"sqlite:///{(work / 'study.db').resolve()}")
        study = optuna.create_study(study_name=f"tune-{key}", storage=storage,
                                    sampler=optuna.samplers.GridSampler({"learning_rate": grid}, seed=tune.seed),
                                    direction="maximize", load_if_exists=True)
        # We hold the lock, so a trial still RUNNING was left by a killed process: it failed, and its
        # grid point (which GridSampler now counts as visited) is queued again below.
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
        finished = {t.params["learning_rate"] for t in trials if t.state == TrialState.COMPLETE}
        waiting = {t.system_attrs.get("fixed_params", {}).get("learning_rate") for t in trials if t.state == TrialState.WAITING}
        todo = [lr for lr in grid if lr not in finished]
        if trials:  # a resumed study: every unfinished point is queued by hand (GridSampler counts failed ones as done)
            for lr in todo:
                if lr not in waiting:
                    study.enqueue_trial({"learning_rate": lr})
        log.info("tune %s: %d of %d grid points to run%s", key, len(todo), len(grid),
                 f" ({len(finished)} finished before)" if finished else "")
        with stage_run("tune", config, tracking, run_name=f"tune-{key}", inputs=[model_dir, train_file, val_file]) as handle:
            handle.set_tags({"onpolicy.method": key})
            if todo:
                objective = _objective(key, method, train, greedy, problems, tune, model_dir, train_file, work, tracking)
                callbacks = []
                if tracking.enabled:
                    callback = _trial_runs(key, f"val_{tune.metric}")
                    objective, callbacks = callback.track_in_mlflow()(objective), [callback]
                study.optimize(objective, n_trials=len(todo), callbacks=callbacks)
            complete = {}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                complete[t.params["learning_rate"]] = {"number": t.number, **t.user_attrs}
            missing = [lr for lr in grid if lr not in complete]
            if missing:
                raise RuntimeError(f"tune {key}: the study ended without trials at {missing}")
            records = [complete[lr] for lr in sorted(grid)]
            chosen = choose_best(records, tune.metric)
            start = _start_policy(model_dir, problems, greedy, work)
            best = {"method": key, "learning_rate": chosen["learning_rate"], "source": "tuned", "metric": tune.metric,
                    "objective": chosen[f"{tune.metric}_ci"], "start_policy": start[f"{tune.metric}_ci"],
                    "trial": chosen["number"], "trials": len(records), "grid": grid,
                    "max_steps": train.common.max_steps, "val_problems": len(problems),
                    "tie_break": f"higher {OTHER_ACCURACY[tune.metric]}, then the lower rate"}
            _write_outputs(out, best, records, tune.metric)
            handle.log_metrics({"learning_rate": best["learning_rate"], f"val_{tune.metric}": best["objective"]["value"],
                                f"val_start_{tune.metric}": best["start_policy"]["value"], "trials_run": len(todo)})
            for name in ("best.json", "trials.json", "validation.png"):
                handle.log_artifact(out / name)
            write_run_record(out, {"mlflow_run_id": handle.run_id, "trials_run": len(todo),
                                   "trials_resumed": len(records) - len(todo)})
        for folder in work.glob("trial-*"):
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        lock.release()
    log.info("tune %s: chose %g (%s %.3f on %d validation problems; the start policy %.3f) -> %s", key,
             best["learning_rate"], tune.metric, best["objective"]["value"], len(problems), best["start_policy"]["value"],
             out / "best.json")
    return best


def _validation_scores(model, tokenizer, problems, greedy: EvalConfig) -> dict:
    """Greedy accuracy (and strict, with 95% Wilson intervals) of `model` on the validation problems,
    generated and graded as the eval stage does."""
    from onpolicy_core.decoding.generation import HFGenerator
    from onpolicy_core.stages.eval import benchmark_metrics, evaluate_benchmark

    responses = evaluate_benchmark(HFGenerator(model, tokenizer, batch_size=greedy.batch_size), tokenizer, VALIDATION,
                                   problems, greedy)
    m = benchmark_metrics(responses, 0)
    n = len(responses)
    return {
        "val_problems": n,
        "greedy_accuracy": m["greedy_accuracy"], "greedy_accuracy_ci": _interval(sum(r["correct"] for r in responses), n),
        "strict_greedy_accuracy": m["strict_greedy_accuracy"],
        "strict_greedy_accuracy_ci": _interval(sum(r["strict_correct"] for r in responses), n),
        "truncated_rate": m["truncated_rate"], "no_answer_rate": m["no_answer_rate"],
        "mean_response_tokens": m["mean_response_tokens"],
    }


def _start_policy(model_dir: Path, problems, greedy: EvalConfig, work: Path) -> dict:
    """The start model's validation scores, computed once per study folder (start.json)."""
    cached = work / "start.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from onpolicy_core.plumbing.models import TRAINING_DTYPE, load_materialised

    model, tokenizer = load_materialised(model_dir, dtype=TRAINING_DTYPE)
    scores = _validation_scores(model.eval(), tokenizer, problems, greedy)
    del model
    gc.collect()
    write_json(cached, scores)
    return scores


def _objective(key: str, method: str, train: TrainConfig, greedy: EvalConfig, problems, tune: TuneConfig, model_dir: Path,
               train_file: str, work: Path, tracking: TrackingConfig):
    """The Optuna objective: train at the trial's rate, score greedily on the validation problems."""
    # Imported here: torch, TRL and the generators load only when a method is tuned, so a fixed
    # rate's stage takes a second.
    from onpolicy_core.plumbing.models import TRAINING_DTYPE, load_materialised
    from onpolicy_core.stages.train import make_trainer, trained_model, training_rows
    rows_file = work / "rows.json"
    if rows_file.is_file():  # the rows (DPO/SimPO: the pairs) of an earlier, killed run of this study
        cached = json.loads(rows_file.read_text())
        rows, pair_summary = cached["rows"], cached["summary"]
    else:  # once per study: every trial trains on the same rows (pairs sampled from the start model)
        pair_summary: dict = {}
        base, tokenizer = load_materialised(model_dir, dtype=TRAINING_DTYPE)
        rows = training_rows(method, train, base, tokenizer, model_dir, read_problems(train_file), pair_summary)
        del base, tokenizer
        write_json(rows_file, {"rows": rows, "summary": pair_summary})

    def objective(trial) -> float:
        lr = trial.suggest_categorical("learning_rate", tune.grid_of(key))
        if tracking.enabled:  # the trial's run (track_in_mlflow): named and tagged now, so a failed trial's run is found too
            import mlflow

            mlflow.set_tags({"mlflow.runName": _trial_name(key, lr), **trial_tags(key)})
        folder = work / f"trial-{trial.number}"
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        model, tokenizer = load_materialised(model_dir, dtype=TRAINING_DTYPE)  # a fresh model and tokenizer, as the train stage loads them
        trainer = make_trainer(method, train, lr, model, tokenizer, rows, folder, tracking)
        result = trainer.train()
        trained = trained_model(trainer, train.common).eval()
        trained_s = time.perf_counter() - start
        scores = _validation_scores(trained, tokenizer, problems, greedy)
        n = scores["val_problems"]
        record = {
            "learning_rate": lr, **scores, "train_loss": result.training_loss,
            "steps": trainer.state.global_step, "train_seconds": round(trained_s, 1),
            "seconds": round(time.perf_counter() - start, 1), **({"pairs": pair_summary["pairs"]} if "pairs" in pair_summary else {}),
        }
        for name, value in record.items():
            trial.set_user_attr(name, value)
        if tracking.enabled:
            import mlflow

            mlflow.log_metrics({f"val/{k}": float(v) for k, v in record.items() if isinstance(v, (int, float))})
        del trainer, trained, model
        gc.collect()
        shutil.rmtree(folder, ignore_errors=True)  # the trial's model and checkpoints: only its score is kept
        log.info("tune %s: lr %g -> %s %.3f (%d problems, %.0f s)", key, lr, tune.metric, record[tune.metric], n, record["seconds"])
        return record[tune.metric]

    return objective


def trial_tags(key: str) -> dict[str, str]:
    """Tags of every trial's MLflow run (`tags.onpolicy.stage = 'tune-trial'` lists them all)."""
    return {"onpolicy.stage": "tune-trial", "onpolicy.method": key}


def _trial_name(key: str, lr: float) -> str:
    return f"tune-{key}-lr{lr:g}"


def _trial_runs(key: str, metric_name: str):
    """optuna_integration's MLflowCallback logging each trial as a run nested under the active stage
    run, in its experiment, named by the trial's rate (the callback itself names runs by trial number,
    renaming the run it reopens)."""
    import mlflow
    from optuna_integration import MLflowCallback

    class TrialRuns(MLflowCallback):
        def __call__(self, study, trial) -> None:
            self._mlflow_kwargs["run_name"] = _trial_name(key, trial.params["learning_rate"])
            super().__call__(study, trial)

    return TrialRuns(metric_name=metric_name, create_experiment=False, mlflow_kwargs={
        "nested": True, "experiment_id": mlflow.active_run().info.experiment_id, "tags": trial_tags(key)})
