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
import json
import sys
from collections import defaultdict
from pathlib import Path

import mlflow

client = mlflow.MlflowClient(tracking_uri="sqlite:///mlflow.db")
exp = client.get_experiment_by_name("onpolicy-sft")
runs = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
latest, reruns = {}, 0
for r in runs:
    stage = r.data.tags.get("onpolicy.dvc_stage") or r.data.tags.get("onpolicy.stage")
    # tune-trial runs nest inside their tune stage's run
    if stage in (None, "pipeline", "tune-trial") or r.info.end_time is None or r.info.status != "FINISHED":
        continue
    # a stage that reran (after a code change; a study spread over sessions) counts once: its last run
    name = r.info.run_name
    reruns += name in latest
    latest[name] = (stage, name, (r.info.end_time - r.info.start_time) / 1000)
# A tune stage resumed across sessions ends in a short run that finds its trials done: it costs at
# least the sum of its trials' times, as its trials.json records them.
for name, (stage, _, seconds) in latest.items():
    trials = Path(f"artifacts/tune/{name.removeprefix('tune-')}/trials.json")
    if stage == "tune" and trials.exists():
        latest[name] = (stage, name, max(seconds, sum(t["seconds"] for t in json.loads(trials.read_text()))))
rows = list(latest.values())
total = sum(s for _, _, s in rows)
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
    fh.write(f"\nEach stage's last finished run, a tune stage's at least the sum of its trials; {reruns} "
             "earlier runs of the same stages (reruns after code changes, which reproduced their outputs) are left out.\n")
print(f"{len(rows)} stage runs ({reruns} earlier reruns left out), {total / 3600:.2f} h")
PY
