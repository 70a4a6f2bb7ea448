#!/usr/bin/env bash
# Run the search on the Ray head against the cluster and the head's MLflow server.
# Extra arguments go to search/run.py, e.g. `-- --num-samples 32 --gpus-per-trial 1`.
set -euo pipefail
HOST=${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}
cd "$HOME/mambalitesr"
exec "$HOME/venv/bin/python" search/run.py --address auto --tracking-uri "http://$HOST:5000" "$@"
