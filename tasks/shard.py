"""Prefect task: one shard of a data stage, `onpolicy <stage> ... --shard I --num-shards N`.

No retries here: the fan-out flow resubmits a failed shard as a new flow run, which also covers a
worker or pod that died (a task retry would not). The shard resumes after its last finished unit.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from prefect import get_run_logger, task

from tasks.process_group import project_env, run_in_process_group


@task(name="stage-shard", task_run_name="onpolicy {argv}")
def run_shard_command(project_dir: str, argv: list[str], log_file: str) -> dict:
    """Run the shard command in its own process group (ended whole on cancel or timeout), its output
    appended to `log_file`; a non-zero exit raises with the command's last error line."""
    logger = get_run_logger()
    log = Path(log_file)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "onpolicy"), *argv]
    start = time.monotonic()
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: onpolicy {' '.join(argv)}\n")
        out.flush()
        returncode = run_in_process_group(cmd, project_dir, project_env(), out, subprocess.STDOUT, logger, "shard", poll_s=0.5)
    seconds = round(time.monotonic() - start, 1)
    if returncode != 0:
        lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        raise RuntimeError(f"onpolicy {' '.join(argv)}: {how} after {seconds} s: {last[:300]}")
    logger.info("onpolicy %s: done in %.1f s (log: %s)", " ".join(argv), seconds, log)
    return {"argv": argv, "seconds": seconds, "log": str(log)}
