#!/usr/bin/env bash
# Start the MLflow tracking server on the Ray head, bound to MLFLOW_HOST (default: this machine's
# first address), port 5000, SQLite backend, artifacts served by the server so remote workers can
# read and write them. The server leads its own session; its id goes to $DATA/server.pid so that
# `scripts/cluster_node.sh stop` (and `ray down`) stop it with its workers.
set -euo pipefail
HOST=${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}
DATA=${MLFLOW_DATA:-$HOME/mlflow}
MLFLOW=${MLFLOW:-$HOME/venv/bin/mlflow}
mkdir -p "$DATA"
if curl -sf "http://$HOST:5000/health" > /dev/null; then
    echo "MLflow already serving at http://$HOST:5000"
    exit 0
fi
# MLflow refuses requests whose Host header is not localhost or a private address (DNS-rebinding
# protection): the head's own address, whatever it is, and the tunnel's localhost are allowed
setsid nohup "$MLFLOW" server --host "$HOST" --port 5000 \
    --allowed-hosts "$HOST,$HOST:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*" \
    --backend-store-uri "sqlite:///$DATA/mlflow.db" --artifacts-destination "$DATA/artifacts" \
    > "$DATA/server.log" 2>&1 < /dev/null &
echo $! > "$DATA/server.pid"
for _ in $(seq 60); do
    curl -sf "http://$HOST:5000/health" > /dev/null && { echo "MLflow at http://$HOST:5000"; exit 0; }
    sleep 1
done
echo "MLflow did not start; see $DATA/server.log" >&2
exit 1
