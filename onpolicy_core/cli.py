"""`onpolicy <stage>`: thin command-line wrappers over the stage functions (DVC calls these)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from onpolicy_core.plumbing.config import ConfigError, Params, load_params

app = typer.Typer(
    help="On-Policy SFT pipeline stages. Each reads params.yaml; --set overrides one key.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file (YAML) mirroring the typed config.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a setting, e.g. --set data.n_eval=20 (value parsed as YAML). Repeatable."),
]


ShardOpt = Annotated[int | None, typer.Option("--shard", help="Process only shard I (0-based) of --num-shards N: a contiguous run of work units; writes no outputs.")]
NumShardsOpt = Annotated[int | None, typer.Option("--num-shards", help="How many shards the work units are split into (with --shard).")]
MergeOpt = Annotated[bool, typer.Option("--merge", help="Write the outputs from every shard's finished work units (no model is loaded).")]


def _sharding(shard: int | None, num_shards: int | None, merge: bool):
    """The Shard of --shard/--num-shards (None: a whole run or a merge); bad combinations are one line."""
    from onpolicy_core.stages.skeleton import Shard

    if merge and shard is not None:
        raise user_error("--merge writes the outputs of all shards; it takes no --shard")
    if (shard is None) != (num_shards is None):
        raise user_error("--shard and --num-shards go together")
    if shard is None:
        return None
    try:
        return Shard(shard, num_shards)
    except ValueError as exc:
        raise user_error(str(exc)) from exc


def user_error(message: str) -> typer.Exit:
    """One line on stderr and exit code 2: what a user error ends in (here and in onpolicy-sharded)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def stage_options(argv: list[str]) -> tuple[Path, list[str]]:
    """The --params file and the --set overrides of `onpolicy <stage> [options]`, read by the stage's
    own typer command (no other option is checked here)."""
    group = typer.main.get_command(app)
    with group.make_context("onpolicy", [argv[0]], resilient_parsing=True) as ctx:
        command = group.get_command(ctx, argv[0])
        with command.make_context(argv[0], list(argv[1:]), parent=ctx, resilient_parsing=True) as sub:
            return Path(sub.params.get("params") or "params.yaml"), list(sub.params.get("set_") or [])


def _load(params: Path, overrides: list[str] | None) -> Params:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        return load_params(params, overrides)
    except ConfigError as exc:
        raise user_error(str(exc)) from exc


@contextlib.contextmanager
def _user_errors():
    """Bad input and bad settings end in one clear line (file, line, reason) and exit code 2,
    not a traceback; anything else is a bug and keeps its traceback."""
    from onpolicy_core.data.io import InputError
    from onpolicy_core.data.sources import SourceError
    from onpolicy_core.decoding.generation import BackendUnavailable
    from onpolicy_core.plumbing.models import ModelSourceError
    from onpolicy_core.plumbing.tracking import TrackingUnavailable

    try:
        yield
    except (ConfigError, InputError, SourceError, ModelSourceError, TrackingUnavailable, BackendUnavailable) as exc:
        raise user_error(str(exc)) from exc
    except Exception as exc:
        from mlflow.exceptions import MlflowException

        if isinstance(exc, MlflowException):  # the tracking server failed mid-stage
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise user_error(f"MLflow: {first[:300]} (MLFLOW_TRACKING_URI={os.environ.get('MLFLOW_TRACKING_URI', 'unset')})") from exc
        raise


@app.command()
def model(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Materialise the model (embedded GGUF, hub id or local folder) as a plain HF folder."""
    from onpolicy_core.stages.model import run_model

    p = _load(params, set_)
    with _user_errors():
        run_model(p.model, p.paths, p.tracking)


@app.command()
def data(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Build train/eval splits in the record format; bad rows are counted and reported by file:line."""
    from onpolicy_core.stages.data import run_data

    p = _load(params, set_)
    with _user_errors():
        run_data(p.data, p.paths, p.tracking)


@app.command()
def prime(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Prime the model into the answer format (model.prime) and write the starting policy that every
    later stage uses; compares the raw and the primed model on held-out primer problems."""
    from onpolicy_core.stages.prime import run_prime

    p = _load(params, set_)
    with _user_errors():
        run_prime(p.model, p.data, p.paths, p.tracking, p.realign.analysis.marker)


@app.command()
def score(
    input: Annotated[Path, typer.Option(help="JSONL records to score (default: the data stage's train split).")] = None,
    output: Annotated[Path, typer.Option(help="Output folder (default: <paths.score>/<input file stem>).")] = None,
    field: Annotated[str, typer.Option(help="Record field scored as the response.")] = "solution",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    shard: ShardOpt = None,
    num_shards: NumShardsOpt = None,
    merge: MergeOpt = False,
) -> None:
    """DDT-score a corpus: phi = log p + H per response token under the model (paper Sec. 3).

    Writes scores.parquet (per example, with per-token phi/logp/entropy), summary.json, metrics.json,
    phi.png and selected.jsonl (the subset passing score.select_threshold / score.select_top_k).
    Settings under `score:` in params.yaml: temperature, max_tokens_per_batch, max_batch_size,
    chunk_size, thresholds, select_threshold, select_top_k, histogram_bins, work_unit, workers.
    """
    from onpolicy_core.stages.score import run_score

    sharding = _sharding(shard, num_shards, merge)
    p = _load(params, set_)
    input = input or Path(p.paths.data) / "train.jsonl"
    output = output or Path(p.paths.score) / input.stem
    with _user_errors():
        run_score(p.score, p.paths, p.tracking, input, output, response_field=field, shard=sharding, merge=merge)


@app.command()
def realign(
    variant: Annotated[str, typer.Option(help="'hinted' or 'self_distill': the variant whose realign.mixing block is used.")] = "hinted",
    input: Annotated[Path, typer.Option(help="JSONL records (default: the data stage's train split).")] = None,
    output: Annotated[Path, typer.Option(help="Output folder (default: <paths.realign>/<variant>).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    shard: ShardOpt = None,
    num_shards: NumShardsOpt = None,
    merge: MergeOpt = False,
) -> None:
    """Hinted Decoding: rewrite each reference solution in the model's own words (paper Sec. 4).

    Writes train.jsonl (after the realign.on_unverified policy), records.jsonl (every example with
    its realigned CoT, finish reason, mean lambda, verification and avg-phi), summary.json and
    metrics.json. Settings under `realign:` in params.yaml; `realign.backend: vllm` decodes on vLLM
    (pairs that lose lockstep are recomputed on HF and counted under decoded_by).
    """
    from typing import get_args

    from onpolicy_core.plumbing.config import RealignVariant
    from onpolicy_core.stages.realign import run_realign

    if variant not in get_args(RealignVariant):
        raise user_error(f"--variant must be one of {list(get_args(RealignVariant))}, got {variant!r}")
    sharding = _sharding(shard, num_shards, merge)
    p = _load(params, set_)
    with _user_errors():
        run_realign(p.realign, p.paths, p.tracking, p.model, variant, input, output, shard=sharding, merge=merge)


@app.command()
def tune(
    method: Annotated[str, typer.Option(help="A key of tune.learning_rates: a method (sft, dft, eaft, eaft_full, idft, dpo, simpo) "
                                              "or <method>-<data> (idft-hinted).")] = "sft",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Choose one method's learning rate: a fixed number is written as it is; 'tuned' runs an Optuna
    grid (the entry's grid, else tune.grid) in which each trial trains the method on the entry's
    training set and is scored on the validation split.

    Writes <paths.tune>/<method>/best.json (the rate the train runs read), trials.json, metrics.json
    and validation.png; a killed study resumes with its unfinished grid points. Settings under `tune:`.
    """
    from onpolicy_core.stages.tune import run_tune

    p = _load(params, set_)
    with _user_errors():
        run_tune(p.tune, p.train, p.eval, p.paths, p.tracking, method)


@app.command()
def train(
    run: Annotated[str, typer.Option(help="<method>-<data>: method in sft, dft, eaft, eaft_full, idft, dpo, simpo; data in original, self_distill, hinted.")] = "idft-original",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Train one method on one data choice with TRL (IDFT: paper Sec. 5) and save a plain HF model.

    Writes <paths.train>/<run>/model, metrics.json and summary.json; resumes from its last
    checkpoint after a kill. Settings under `train:` in params.yaml (common, and the idft, eaft, preference blocks).
    """
    from onpolicy_core.stages.train import run_train

    p = _load(params, set_)
    with _user_errors():
        run_train(p.train, p.paths, p.tracking, run, p.tune)


@app.command(name="eval")
def eval_(
    model: Annotated[str, typer.Option(help="'base' (the materialised model) or a training run <method>-<data>.")] = "base",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    shard: ShardOpt = None,
    num_shards: NumShardsOpt = None,
    merge: MergeOpt = False,
) -> None:
    """Evaluate a model on the eval.benchmarks: greedy accuracy, Avg@k, pass@k, response length.

    Writes <paths.eval>/<model>/records.parquet (every response, graded), metrics.json and
    summary.json; logs under the model's training run in MLflow. Settings under `eval:`
    (backend hf | vllm, samples, temperature, top_p, max_new_tokens, limit, vllm block, work_unit, workers).
    """
    from onpolicy_core.stages.eval import run_eval

    sharding = _sharding(shard, num_shards, merge)
    p = _load(params, set_)
    with _user_errors():
        run_eval(p.eval, p.paths, p.tracking, p.model, p.data, model, shard=sharding, merge=merge)


@app.command()
def general(
    model: Annotated[str, typer.Option(help="'base' (the materialised model) or a training run <method>-<data>.")] = "base",
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """General-ability retention: ARC-Easy, ARC-Challenge, MMLU-STEM as multiple choice by log-likelihood.

    Writes <paths.general>/<model>/records.parquet (every question, per-choice log p), summary.json
    (acc and acc_norm with 95% intervals, chance rate, skips) and metrics.json; resumes after a kill.
    Settings under `general:` (benchmarks, data_root, limit, limit_order, seed, batch_size, precision, work_unit).
    """
    from onpolicy_core.stages.general import run_general

    p = _load(params, set_)
    with _user_errors():
        run_general(p.general, p.paths, p.tracking, p.model, model)


@app.command()
def report(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Compare base and every train.runs model: report.md, comparison.png, comparison.json."""
    from onpolicy_core.stages.report import run_report

    p = _load(params, set_)
    with _user_errors():
        run_report(p.report, p.paths, p.tracking, p.eval, list(p.train.runs), general=p.general,
                   rate_files={run: spec.rate_file for run, spec in p.train.runs.items()})


@app.command()
def preset(
    name: Annotated[str, typer.Argument(help="A file name in presets/ without .yaml: cpu-default, gsm8k, paper, study.")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Apply a preset onto params.yaml (comments kept; the result is validated before it is written)."""
    from onpolicy_core.plumbing.presets import apply_preset

    logging.basicConfig(level=logging.INFO)
    with _user_errors():
        apply_preset(name, params)
    typer.echo(f"applied presets/{name}.yaml to {params}; `git diff {params}` shows the changes, `dvc repro` runs them")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def repro(ctx: typer.Context, params: ParamsOpt = Path("params.yaml")) -> None:
    """`dvc repro` inside one parent MLflow run: every stage that runs nests under it, and the run
    keeps params.yaml and the resulting dvc.lock. Extra arguments go to `dvc repro`."""
    import subprocess
    import sys

    from onpolicy_core.plumbing.tracking import pipeline_run

    p = _load(params, None)
    with _user_errors(), pipeline_run(p.tracking, tags={"onpolicy.entry": "onpolicy repro"}) as run_id:
        if run_id:
            typer.echo(f"MLflow pipeline run {run_id}")
        code = subprocess.call([sys.executable, "-m", "dvc", "repro", *ctx.args])
        if code:
            raise typer.Exit(code)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
