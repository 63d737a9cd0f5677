#!/usr/bin/env bash
# Copy what the pipeline wrote for the CPU study into docs/results/cpu-study/: the report, the plot, the
# params used, the priming check, every tuning trial, the realignment summaries, the git commit, and the
# wall time of every stage (from the MLflow stage runs nested under the `pipeline` parent run of each
# `onpolicy repro`). Run from the study's project folder.
set -euo pipefail
dest=${1:?usage: collect.sh DEST [REPORT_DIR]}
report=${2:-artifacts/report}   # another report folder: `onpolicy report -p <params with fewer train.runs>` of a study still running
mkdir -p "$dest"
cp "$report/report.md" "$report/comparison.png" "$report/comparison.json" params.yaml dvc.lock "$dest/"
# The choices made on the way: priming, each method's learning-rate trials, the realignment verdicts.
cp artifacts/prime/summary.json "$dest/prime.json"
for method in artifacts/tune/*/; do
  m=$(basename "$method")
  [ -s "$method/trials.json" ] && [ "$(cat "$method/trials.json")" != "[]" ] || continue
  cp "$method/trials.json" "$dest/tune-$m.json"; cp "$method/validation.png" "$dest/tune-$m.png"
done
for variant in artifacts/realign/*/; do cp "$variant/summary.json" "$dest/realign-$(basename "$variant").json"; done
git rev-parse HEAD > "$dest/git-commit.txt"
python - "$dest" <<'PY'
import sys
from collections import defaultdict

import mlflow

client = mlflow.MlflowClient(tracking_uri="sqlite:///mlflow.db")
exp = client.get_experiment_by_name("onpolicy-sft")
runs = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
rows, total = [], 0.0
for r in runs:
    stage = r.data.tags.get("onpolicy.dvc_stage") or r.data.tags.get("onpolicy.stage")
    # tune-trial runs nest inside their tune stage's run, whose time already holds them
    if stage in (None, "pipeline", "tune-trial") or r.info.end_time is None or r.info.status != "FINISHED":
        continue
    seconds = (r.info.end_time - r.info.start_time) / 1000
    rows.append((stage, r.info.run_name, seconds))
    total += seconds
by_kind = defaultdict(float)
for stage, _, s in rows:
    by_kind[stage.split("@")[0]] += s
with open(f"{sys.argv[1]}/timings.md", "w") as fh:
    fh.write("# Wall time per stage of the CPU study (MLflow stage runs; 2 CPU cores)\n\n| stage | MLflow run | seconds |\n|---|---|---|\n")
    for stage, name, s in rows:
        fh.write(f"| {stage} | {name} | {s:.0f} |\n")
    fh.write(f"\n| kind | seconds |\n|---|---|\n")
    for kind, s in by_kind.items():
        fh.write(f"| {kind} | {s:.0f} |\n")
    fh.write(f"| **total** | **{total:.0f}** ({total / 3600:.2f} h) |\n")
print(f"{len(rows)} stage runs, {total / 3600:.2f} h")
PY
