"""The tune stage: a fixed rate is written without a model; a tuned one is an Optuna grid on the
validation split whose best trial the train stage then reads, resumable and logged to MLflow."""

import dataclasses
import json

import pytest

from onpolicy_core.data.io import InputError, write_json, write_jsonl
from onpolicy_core.plumbing.config import MethodRate
from onpolicy_core.stages import tune as tune_stage
from onpolicy_core.stages.train import read_learning_rate
from tests.conftest import KilledOnCall, default_config

BASE = default_config()
ORIGINAL = BASE.tune.learning_rates["sft"].data
OFF = dataclasses.replace(BASE.tracking, enabled=False)


def _tune(**fields):
    return dataclasses.replace(BASE.tune, **fields)


@pytest.mark.unit
def test_a_fixed_rate_is_written_at_once_without_a_model(tmp_path):
    paths = dataclasses.replace(BASE.paths, model=str(tmp_path / "no-model"), policy=str(tmp_path / "no-model"), data=str(tmp_path / "no-data"), tune=str(tmp_path / "tune"))
    best = tune_stage.run_tune(BASE.tune, BASE.train, BASE.eval, paths, OFF, "dft")
    out = tmp_path / "tune" / "dft"
    assert best == json.loads((out / "best.json").read_text())
    assert (best["learning_rate"], best["source"], best["trials"]) == (BASE.tune.learning_rates["dft"].rate, "fixed", 0)
    assert json.loads((out / "trials.json").read_text()) == []
    assert json.loads((out / "metrics.json").read_text()) == {"learning_rate": best["learning_rate"], "trials": 0}
    assert (out / "validation.png").read_bytes()[:4] == b"\x89PNG"
    before = (out / "best.json").read_bytes()
    tune_stage.run_tune(_tune(grid=[1e-6], seed=5), BASE.train, BASE.eval, paths, OFF, "dft")
    assert (out / "best.json").read_bytes() == before, "tuning settings do not touch a fixed rate: the train runs stay up to date"
    assert read_learning_rate(paths, "dft", BASE.tune) == (best["learning_rate"], "fixed")


@pytest.mark.unit
def test_an_entry_per_training_set_tunes_on_that_set(tmp_path):
    """idft-hinted's trials train on Hinted Decoding's rewrites: without them, one line naming the file
    and the stage that makes it; a fixed rate lands in its own folder, which its runs read."""
    paths = dataclasses.replace(BASE.paths, data=str(tmp_path / "data"), realign=str(tmp_path / "realign"), tune=str(tmp_path / "tune"))
    entry = MethodRate("tuned", "train.idft", "unused", [1e-4])
    tune = _tune(learning_rates={**BASE.tune.learning_rates, "idft-hinted": entry})
    with pytest.raises(InputError, match=r"realign/hinted/train.jsonl: no training set for tune.learning_rates.idft-hinted; "
                                         r"run `dvc repro realign@hinted`"):
        tune_stage.run_tune(tune, BASE.train, BASE.eval, paths, OFF, "idft-hinted")
    fixed = _tune(learning_rates={**BASE.tune.learning_rates, "idft-hinted": dataclasses.replace(entry, rate=3e-4)})
    assert tune_stage.run_tune(fixed, BASE.train, BASE.eval, paths, OFF, "idft-hinted")["learning_rate"] == 3e-4
    assert read_learning_rate(paths, fixed.key_of("idft-hinted-s2"), fixed) == (3e-4, "fixed")
    write_json(tmp_path / "tune" / "idft-hinted" / "best.json", {"source": "tuned", "grid": [1e-4], "learning_rate": 1e-4})
    assert read_learning_rate(paths, "idft-hinted", tune) == (1e-4, "tuned"), "checked against the entry's own grid"


@pytest.mark.unit
def test_train_refuses_a_rate_chosen_under_other_settings(tmp_path):
    paths = dataclasses.replace(BASE.paths, tune=str(tmp_path / "tune"))
    with pytest.raises(InputError, match="run `onpolicy tune --method sft`"):
        read_learning_rate(paths, "sft")
    tune_stage.run_tune(BASE.tune, BASE.train, BASE.eval, paths, OFF, "sft")
    other = _tune(learning_rates={**BASE.tune.learning_rates, "sft": MethodRate(5e-4, "train.common", ORIGINAL, None)})
    with pytest.raises(InputError, match="chosen under other settings"):
        read_learning_rate(paths, "sft", other)
    tuned = _tune(learning_rates={**BASE.tune.learning_rates, "sft": MethodRate("tuned", "train.common", ORIGINAL, None)})
    with pytest.raises(InputError, match="chosen under other settings"):
        read_learning_rate(paths, "sft", tuned)


def test_choose_best_breaks_ties_by_the_other_accuracy_then_the_lower_rate():
    t = [{"learning_rate": 1e-3, "greedy_accuracy": 0.5, "strict_greedy_accuracy": 0.25},
         {"learning_rate": 1e-4, "greedy_accuracy": 0.5, "strict_greedy_accuracy": 0.25},
         {"learning_rate": 3e-4, "greedy_accuracy": 0.5, "strict_greedy_accuracy": 0.5},
         {"learning_rate": 1e-5, "greedy_accuracy": 0.25, "strict_greedy_accuracy": 0.75}]
    assert tune_stage.choose_best(t, "greedy_accuracy")["learning_rate"] == 3e-4
    assert tune_stage.choose_best(t[:2], "greedy_accuracy")["learning_rate"] == 1e-4
    assert tune_stage.choose_best(t, "strict_greedy_accuracy")["learning_rate"] == 1e-5


@pytest.mark.unit
def test_the_plot_takes_a_trial_that_never_scored(tmp_path):
    """At 0 of n the Wilson lower bound can sit a rounding error above 0 (statsmodels: 6.9e-18 for 0/48);
    matplotlib refuses a negative error bar, and the tune stage failed on it after all its trials."""
    from onpolicy_core.algorithms.statistics import wilson

    trials = []
    for lr, correct in ((1e-4, 19), (1e-2, 0)):
        e = wilson(correct, 48)
        ci = {"value": e.value, "low": e.low, "high": e.high, "n": 48}
        trials.append({"learning_rate": lr, "greedy_accuracy": e.value, "strict_greedy_accuracy": e.value,
                       "greedy_accuracy_ci": ci})
    tune_stage.plot_trials(trials, tmp_path / "validation.png", "sft", "greedy_accuracy")
    assert (tmp_path / "validation.png").stat().st_size > 0


GRID = [1e-5, 1e-3]


def test_tuning_on_the_embedded_model_resumes_and_logs_every_trial(embedded_model_dir, tmp_path, monkeypatch):
    import mlflow
    import optuna

    from tests.conftest import arithmetic_corpus

    data = tmp_path / "data"
    arithmetic_corpus(data / "train.jsonl", 8, 1, 2, 9, seed=4)
    arithmetic_corpus(data / "val.jsonl", 6, 1, 2, 9, seed=11)
    write_jsonl(data / "eval.jsonl", [])
    paths = dataclasses.replace(BASE.paths, model=str(embedded_model_dir), policy=str(embedded_model_dir), data=str(data), tune=str(tmp_path / "tune"))
    tune = _tune(learning_rates={"sft": MethodRate("tuned", "train.common", ORIGINAL, None)}, grid=GRID, max_steps=1, val_limit=4)
    train = dataclasses.replace(BASE.train, common=dataclasses.replace(BASE.train.common, batch_size=2, lr_scheduler="constant",
                                                                       log_model=False))
    eval_cfg = dataclasses.replace(BASE.eval, max_new_tokens=24, batch_size=4)
    tracking = dataclasses.replace(BASE.tracking, experiment="tune-test", registry=False)

    def run():
        return tune_stage.run_tune(tune, train, eval_cfg, paths, tracking, "sft")

    # Killed as its second trial starts training: one trial finished, one failed in the study.
    from onpolicy_core.stages import train as train_stage

    real_make_trainer = train_stage.make_trainer
    monkeypatch.setattr(train_stage, "make_trainer", KilledOnCall(real_make_trainer, kill_at=2))
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(train_stage, "make_trainer", real_make_trainer)
    assert not (tmp_path / "tune" / "sft" / "best.json").exists()

    best = run()  # resumes: only the unfinished grid point trains
    out = tmp_path / "tune" / "sft"
    record = json.loads((tmp_path / ".runs" / "tune" / "sft.json").read_text())
    assert (record["trials_run"], record["trials_resumed"]) == (1, 1)
    trials = json.loads((out / "trials.json").read_text())
    assert [t["learning_rate"] for t in trials] == GRID
    for t in trials:
        assert t["val_problems"] == 4 and t["steps"] == 1 and t["seconds"] > 0 and t["train_loss"] > 0
        ci = t["greedy_accuracy_ci"]
        assert ci["low"] <= ci["value"] == t["greedy_accuracy"] <= ci["high"] and ci["n"] == 4
    expected = max(trials, key=lambda t: (t["greedy_accuracy"], t["strict_greedy_accuracy"], -t["learning_rate"]))
    assert best == json.loads((out / "best.json").read_text())
    assert (best["learning_rate"], best["source"], best["trials"], best["grid"]) == (expected["learning_rate"], "tuned", 2, GRID)
    assert best["objective"] == expected["greedy_accuracy_ci"]
    start = best["start_policy"]  # the start model on the same problems, scored once per study folder
    assert start["n"] == 4 and start["low"] <= start["value"] <= start["high"]
    assert json.loads((tmp_path / ".tune.partial" / "sft" / "start.json").read_text())["greedy_accuracy_ci"] == start
    assert read_learning_rate(paths, "sft", tune) == (expected["learning_rate"], "tuned")
    assert not list((tmp_path / ".tune.partial" / "sft").glob("trial-*")), "trial models deleted"

    run()  # everything finished under the same settings: no new trial
    assert json.loads((tmp_path / ".runs" / "tune" / "sft.json").read_text())["trials_run"] == 0
    study = optuna.load_study(study_name="tune-sft", storage=f"sqlite:///{tmp_path / '.tune.partial' / 'sft' / 'study.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"], "the killed trial failed, its grid point ran again, nothing since"

    runs = mlflow.search_runs(experiment_names=["tune-test"], output_format="list")
    trial_runs = [r for r in runs if r.data.tags.get("onpolicy.stage") == "tune-trial"]
    finished = [r for r in trial_runs if r.info.status == "FINISHED"]
    assert len(finished) == 2 and len(trial_runs) == len(study.trials), "one MLflow run per Optuna trial"
    assert sorted(r.info.run_name for r in finished) == sorted(f"tune-sft-lr{lr:g}" for lr in GRID)
    stage_runs = {r.info.run_id for r in runs if r.data.tags.get("onpolicy.stage") == "tune"}
    assert all(r.data.tags["mlflow.parentRunId"] in stage_runs for r in trial_runs), "trials nest under the tune stage's run"
    for r in finished:
        assert float(r.data.params["learning_rate"]) in GRID and "val_greedy_accuracy" in r.data.metrics
        assert "loss" in r.data.metrics, "the trainer's per-step logs land in the trial's run"
    last = max((r for r in runs if r.info.run_id in stage_runs and r.info.status == "FINISHED"), key=lambda r: r.info.start_time)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(last.info.run_id)}
    assert {"best.json", "trials.json", "validation.png"} <= artifacts


@pytest.mark.unit
def test_the_report_lists_each_methods_learning_rate(tmp_path):
    from onpolicy_core.data.io import write_json
    from onpolicy_core.stages.report import learning_rate_section, learning_rates

    paths = dataclasses.replace(BASE.paths, tune=str(tmp_path / "tune"))
    tune_stage.run_tune(BASE.tune, BASE.train, BASE.eval, paths, OFF, "sft")
    tuned = {"method": "idft", "learning_rate": 1e-3, "source": "tuned", "metric": "greedy_accuracy", "trials": 2, "grid": [1e-4, 1e-3],
             "objective": {"value": 0.5, "low": 0.3, "high": 0.7, "n": 20},
             "start_policy": {"value": 0.25, "low": 0.1, "high": 0.45, "n": 20}}
    write_json(tmp_path / "tune" / "idft" / "best.json", tuned)
    rates = learning_rates(paths, ["sft-original", "idft-original", "idft-hinted", "dft-original"])
    assert list(rates) == ["sft", "idft", "dft"] and rates["dft"] is None and rates["idft"] == tuned
    text = "\n".join(learning_rate_section(rates))
    assert text.startswith("## Learning rates")
    assert f"| sft | {BASE.tune.learning_rates['sft'].rate:g} | fixed | – | – | – | 0 |" in text
    assert "| idft | 0.001 | tuned | 0.0001, 0.001 | 50.0 [30.0, 70.0] (n = 20, greedy_accuracy) | 25.0 [10.0, 45.0] | 2 |" in text
    assert "| dft | – | no best.json" in text
