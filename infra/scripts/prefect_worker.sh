#!/usr/bin/env bash
# A process worker for the project's deployments (prefect.yaml), run from the project root with the
# project's environment on PATH. Creates the work pool on first use. Extra arguments go to
# `prefect worker start` (e.g. --run-once).
set -euo pipefail
POOL="${ONPOLICY_WORK_POOL:-onpolicy-local}"
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
exec prefect worker start --pool "$POOL" "$@"
