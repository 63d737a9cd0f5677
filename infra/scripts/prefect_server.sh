#!/usr/bin/env bash
# Prefect server without Docker (SQLite under $PREFECT_HOME). Binds to 127.0.0.1 unless
# PREFECT_SERVER_HOST says otherwise. UI at http://127.0.0.1:4200; clients need
#   export PREFECT_API_URL=http://127.0.0.1:4200/api
set -euo pipefail
exec prefect server start --host "${PREFECT_SERVER_HOST:-127.0.0.1}" --port "${PREFECT_SERVER_PORT:-4200}"
