#!/usr/bin/env bash
# Learning-rate choice for the CPU study on the validation split (data.n_val problems carved from the
# training pool; benchmark arithmetic_val), never on the evaluation benchmarks. SFT on the original
# data at each rate; every method then uses the chosen rate. Run from a project with the study preset
# applied (`onpolicy preset study`); writes artifacts/tune/ and prints tune.md to stdout.
set -euo pipefail
RATES=${RATES:-"3.0e-05 1.0e-04 3.0e-04"}
dvc repro model data
for lr in $RATES; do
  onpolicy train --run sft-original --set "train.common.learning_rate=$lr" --set "paths.train=artifacts/tune/train-lr-$lr" \
    --set train.log_model=false --set tracking.enabled=false
  onpolicy eval --model sft-original --set "paths.train=artifacts/tune/train-lr-$lr" --set "paths.eval=artifacts/tune/eval-lr-$lr" \
    --set 'eval.benchmarks=[arithmetic_val]' --set eval.limit=null --set tracking.enabled=false
done
python - "$RATES" <<'PY'
import json, sys
from onpolicy_core.statistics import wilson
print("| learning rate | val problems | greedy accuracy [95% CI] | strict [95% CI] | truncated |")
print("|---|---|---|---|---|")
for lr in sys.argv[1].split():
    m = json.load(open(f"artifacts/tune/eval-lr-{lr}/sft-original/metrics.json"))["arithmetic_val"]
    n = int(m["problems"])
    a, s = wilson(round(m["greedy_accuracy"] * n), n), wilson(round(m["strict_greedy_accuracy"] * n), n)
    print(f"| {lr} | {n} | {100*a.value:.1f} [{100*a.low:.1f}, {100*a.high:.1f}] | {100*s.value:.1f} [{100*s.low:.1f}, "
          f"{100*s.high:.1f}] | {100*m['truncated_rate']:.1f}% |")
PY
