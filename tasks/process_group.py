"""Stage commands as child processes in their own process group: a Prefect timeout or cancel
ends the whole group, so no stage command outlives its task. Shared by the DVC-stage and shard tasks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from onpolicy_core.plumbing.tracking import DVC_STAGE_ENV


def project_env(stage: str | None = None) -> dict[str, str]:
    """PATH with this interpreter's bin first, so `dvc` and the stage commands (`onpolicy ...`)
    resolve to the project's environment even when the worker was started without activating it."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if stage:
        env[DVC_STAGE_ENV] = stage
    return env


GRACE_S = 10
"""After a timeout or cancel: seconds between SIGTERM and SIGKILL of the stage's process group."""


def end_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group (dvc and every command it started), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_in_process_group(cmd: list[str], cwd: str | Path, env: dict[str, str], stdout: IO[Any], stderr: IO[Any] | int,
                         logger: Any, what: str, poll_s: float = 0.2) -> int:
    """Run `cmd` in a new session and wait; the wait polls, so a Prefect timeout or cancel raises in
    this thread at once, and the whole group is then ended before the exception goes on. Output goes
    to files, not pipes, so a long wait cannot fill them. Returns the exit code."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True, start_new_session=True)
    try:
        while True:
            try:
                return proc.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        logger.warning("%s interrupted: ending its process group %d", what, proc.pid)
        end_process_group(proc)
        raise
