"""Browser check of what a user sees in MLflow: start the MLflow UI on a finished pipeline's tracking
store and capture, with headless Chromium, the runs table of every model's evaluation side by side
(one row per model, the same `<benchmark>/<metric>` columns), as a PNG.

    .venv/bin/python bench/mlflow_ui_screenshot.py                      # the project's mlflow.db (after make repro)
    .venv/bin/python bench/mlflow_ui_screenshot.py --tracking-uri sqlite:////path/mlflow.db --out shot.png

Chromium comes from the Debian package (`apt-get install chromium`); without it the check is skipped
with a message (exit 0). It also prints, from the MLflow API, the table the screenshot should show.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_table(tracking_uri: str, experiment: str) -> tuple[str, list[dict]]:
    """(experiment id, one row per evaluated model: its tags and `<benchmark>/<metric>` values)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        sys.exit(f"error: no experiment {experiment!r} in {tracking_uri}; run `make repro` first")
    runs = client.search_runs([found.experiment_id], "tags.`onpolicy.stage` = 'eval'", order_by=["attributes.start_time DESC"])
    latest: dict[str, dict] = {}
    for run in runs:  # the newest evaluation of each model
        model = run.data.tags.get("onpolicy.model", run.info.run_name)
        latest.setdefault(model, {"model": model, **{k: v for k, v in run.data.metrics.items() if "/" in k}})
    return found.experiment_id, list(latest.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    ap.add_argument("--experiment", default="onpolicy-sft")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "mlflow-runs-table.png"))
    args = ap.parse_args()

    experiment_id, rows = eval_table(args.tracking_uri, args.experiment)
    keys = sorted({k for r in rows for k in r if k.endswith(("greedy_accuracy", "avg_at_k"))})
    print("model".ljust(22) + "".join(k.ljust(34) for k in keys))
    for r in rows:
        print(r["model"].ljust(22) + "".join(f"{r.get(k, float('nan')):<34.3f}" for k in keys))
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        print("skipped: no Chromium here (Debian: apt-get install chromium); the table above is what the UI shows")
        return
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.tracking_uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("error: the MLflow UI did not start")
                time.sleep(1)
        # The view the report stage shares in the experiment (filter + metric columns), else the filter alone.
        import mlflow

        tags = mlflow.MlflowClient(tracking_uri=args.tracking_uri).get_experiment(experiment_id).tags
        if "mlflow.sharedViewState.onpolicy-comparison" in tags:
            url = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?viewStateShareKey=onpolicy-comparison"
        else:
            query = urllib.parse.urlencode({"searchFilter": "tags.`onpolicy.stage` = 'eval'", "compareRunsMode": "TABLE",
                                            "orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"})
            url = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?{query}"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=2560,900", "--virtual-time-budget=20000", f"--screenshot={args.out}", url],
                       check=True, capture_output=True, timeout=180)
        print(f"runs table of {len(rows)} models ({url}) -> {args.out}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
