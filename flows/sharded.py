"""Scale-out of the data stages (score, realign, eval) through Prefect work pools (docs/scale.md).

`onpolicy-sharded <stage> [args]` is the DVC command of those stages. With `<stage>.workers: 1` it
*is* `onpolicy <stage> [args]` (exec'd in the same process). With N > 1 it runs the flow `fan_out`:
N runs of the shard deployment (`scale.deployment`, flow `shard` below) on the pool's workers, each
`onpolicy <stage> [args] --shard I --num-shards N`; a failed or crashed shard is submitted again up to
`scale.shard_retries` times (it resumes after its last finished work unit); then
`onpolicy <stage> [args] --merge` writes exactly the files of a one-process run. DVC stays the judge
of whether the stage is stale: `workers` is not a DVC param, and the merged bytes do not depend on it.

A shard that fails every retry ends the command with one line naming the shard and its log, and no
merged output (DVC removed the stage's outputs before running it).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import typer
from prefect import flow, get_run_logger

from onpolicy_core.cli import stage_options, user_error
from onpolicy_core.plumbing.config import ConfigError, load_params
from tasks.shard import run_shard_command

SHARDED_STAGES = ("score", "realign", "eval")


class ShardFailed(RuntimeError):
    """A shard failed every attempt; the message is the one line the user reads."""


def log_path(project: Path, runs_dir: str, argv: list[str], index: int, count: int) -> Path:
    """Where shard `index` of `count` of this stage command writes its output (one file per shard,
    appended by every attempt)."""
    slug = "_".join(filter(None, (re.sub(r"[^\w.=-]+", "-", a).strip("-") for a in argv)))[:120]
    return project / runs_dir / "shards" / f"{slug}.shard-{index}-of-{count}.log"


@flow(name="onpolicy-shard", log_prints=True)
def shard(project_dir: str, argv: list[str], index: int, count: int, log_file: str) -> dict:
    """One shard: `onpolicy <argv> --shard index --num-shards count` in the project (a worker of the
    pool runs it; on Kubernetes, in a pod with the project on a shared volume)."""
    return run_shard_command(project_dir, [*argv, "--shard", str(index), "--num-shards", str(count)], log_file)


def _state(client, run_id) -> tuple[str, str]:
    state = client.read_flow_run(run_id).state
    return (state.type.value if state else "PENDING"), ((state.message or state.name) if state else "")


@flow(name="onpolicy-fan-out", log_prints=True)
def fan_out(project_dir: str, argv: list[str], workers: int, deployment: str, retries: int, timeout_s: int,
            poll_s: float, runs_dir: str) -> list[dict]:
    """Submit `workers` shard runs of `deployment`, resubmit failed ones up to `retries` times, and
    return once every shard completed (or raise ShardFailed, cancelling the shards still running)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    logger = get_run_logger()
    project = Path(project_dir).resolve()
    logs = {i: log_path(project, runs_dir, argv, i, workers) for i in range(workers)}

    def submit(i: int):
        logs[i].parent.mkdir(parents=True, exist_ok=True)
        return run_deployment(deployment, parameters={"project_dir": str(project), "argv": argv, "index": i, "count": workers,
                                                      "log_file": str(logs[i])},
                              timeout=0, flow_run_name=f"{argv[0]}-shard-{i}-of-{workers}")

    runs = {i: submit(i) for i in range(workers)}
    started = {i: time.monotonic() for i in range(workers)}
    attempts = dict.fromkeys(range(workers), 1)
    history: dict[int, list[str]] = {i: [] for i in range(workers)}
    pending = set(runs)
    waiting_warned: set[int] = set()
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(poll_s)
            for i in sorted(pending):
                kind, message = _state(client, runs[i].id)
                if kind == StateType.COMPLETED.value:
                    pending.discard(i)
                    continue
                if kind in (StateType.SCHEDULED.value, StateType.PENDING.value) and time.monotonic() - started[i] > 60 \
                        and i not in waiting_warned:
                    waiting_warned.add(i)
                    logger.warning("shard %d of %d has waited over 60 s for a worker: is one running on the deployment's pool "
                                   "(infra/scripts/prefect_worker.sh --limit 1)?", i, workers)
                timed_out = time.monotonic() - started[i] > timeout_s
                if kind not in (StateType.FAILED.value, StateType.CRASHED.value, StateType.CANCELLED.value) and not timed_out:
                    continue
                if timed_out:
                    client.set_flow_run_state(runs[i].id, Cancelling(message=f"shard ran past scale.shard_timeout_s={timeout_s}"), force=True)
                    kind, message = "TIMED_OUT", f"ran past scale.shard_timeout_s={timeout_s}"
                history[i].append(kind)
                first_line = (message or kind).strip().splitlines()[-1][:300] if (message or kind).strip() else kind
                if attempts[i] > retries:
                    for j in pending - {i}:
                        client.set_flow_run_state(runs[j].id, Cancelling(message=f"shard {i} failed"), force=True)
                    raise ShardFailed(f"{argv[0]}: shard {i} of {workers} failed {attempts[i]} time(s) ({kind}: {first_line}); "
                                      f"log: {os.path.relpath(logs[i], project)}")
                logger.warning("shard %d of %d: %s (%s); submitting it again (attempt %d of %d)", i, workers, kind,
                               first_line, attempts[i] + 1, retries + 1)
                attempts[i] += 1
                runs[i], started[i] = submit(i), time.monotonic()
    print(f"{argv[0]}: {workers} shards completed ({sum(attempts.values()) - workers} resubmitted)")
    return [{"shard": i, "flow_run_id": str(runs[i].id), "attempts": attempts[i], "failed": history[i]} for i in range(workers)]


def main(argv: list[str] | None = None) -> None:
    """`onpolicy-sharded <stage> [args]`: the stage in this process (workers 1) or fanned out and merged."""
    try:
        _sharded(list(sys.argv[1:] if argv is None else argv))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


def _sharded(argv: list[str]) -> None:
    onpolicy = shutil.which("onpolicy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not argv or argv[0] not in SHARDED_STAGES or onpolicy is None:
        raise user_error(f"usage: onpolicy-sharded {{{','.join(SHARDED_STAGES)}}} [onpolicy stage options]"
                         + ("" if onpolicy else " (the onpolicy command is not installed)"))
    try:
        params = load_params(*stage_options(argv))
    except ConfigError as exc:
        raise user_error(str(exc)) from None
    workers = getattr(params, argv[0]).workers
    if workers == 1:
        os.execv(onpolicy, [onpolicy, *argv])
    scale = params.scale
    try:
        fan_out(str(Path.cwd()), argv, workers, scale.deployment, scale.shard_retries, scale.shard_timeout_s, scale.poll_s,
                str(Path(params.paths.data).parent / ".runs"))
    except ShardFailed as exc:
        raise user_error(str(exc)) from None
    except Exception as exc:  # no server, no deployment: say which, in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise user_error(f"{argv[0]}.workers={workers} needs the Prefect deployment {scale.deployment!r} and a worker on its pool "
                         f"(PREFECT_API_URL={os.environ.get('PREFECT_API_URL', 'unset')}): {type(exc).__name__}: {first[:300]}") from None
    os.execv(onpolicy, [onpolicy, *argv, "--merge"])


if __name__ == "__main__":
    main()
