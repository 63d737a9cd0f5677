#!/usr/bin/env bash
# MLflow tracking server without Docker: SQLite (or any SQLAlchemy URI) + a local artifact folder.
# Binds to 127.0.0.1 unless MLFLOW_HOST says otherwise. Open the UI at http://$MLFLOW_HOST:$MLFLOW_PORT
# and point the pipeline at it: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
set -euo pipefail
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
STATE="${MLFLOW_STATE_DIR:-$PWD/.mlflow-server}"
mkdir -p "$STATE"
exec mlflow server \
  --host "$HOST" --port "$PORT" \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STATE/mlflow.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-$STATE/artifacts}" \
  --workers "${MLFLOW_WORKERS:-1}"
