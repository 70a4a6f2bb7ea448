#!/usr/bin/env bash
# Start the MLflow tracking server on the Ray head, bound to its private address (port 5000),
# SQLite backend, artifacts served by the server so remote workers can read and write them.
set -euo pipefail
HOST=${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}
DATA=${MLFLOW_DATA:-$HOME/mlflow}
mkdir -p "$DATA"
if curl -sf "http://$HOST:5000/health" > /dev/null; then
    echo "MLflow already serving at http://$HOST:5000"
    exit 0
fi
nohup "$HOME/venv/bin/mlflow" server --host "$HOST" --port 5000 \
    --backend-store-uri "sqlite:///$DATA/mlflow.db" --artifacts-destination "$DATA/artifacts" \
    > "$DATA/server.log" 2>&1 &
for _ in $(seq 60); do
    curl -sf "http://$HOST:5000/health" > /dev/null && { echo "MLflow at http://$HOST:5000"; exit 0; }
    sleep 1
done
echo "MLflow did not start; see $DATA/server.log" >&2
exit 1
