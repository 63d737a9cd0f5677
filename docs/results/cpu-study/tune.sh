#!/usr/bin/env bash
# Superseded: the pipeline now chooses each method's learning rate itself (stage tune@<method>, an Optuna
# grid on the validation split; README "Learning rates"). `onpolicy preset study && make repro` tunes SFT,
# DFT, IDFT, DPO and SimPO; `onpolicy tune --method sft` tunes one. tune.md beside this file keeps the
# record of the first study's hand-run choice (SFT only, one rate for every method).
echo "docs/results/cpu-study/tune.sh is superseded: the pipeline tunes learning rates (stage tune@<method>; README 'Learning rates')." >&2
exit 2
