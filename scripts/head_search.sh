#!/usr/bin/env bash
# Run the search on the Ray head against the cluster and the head's MLflow server:
#   ray exec ray_cluster.local.yaml "bash ~/mambalitesr/scripts/head_search.sh --num-samples 32 --gpus-per-trial 1"
# Arguments go to search/run.py. The MLflow server's address is the one the head started it on
# (scripts/cluster_node.sh start-head), else MLFLOW_HOST, else this machine's first address.
set -euo pipefail
DATA=${MLFLOW_DATA:-$HOME/mlflow}
if [[ -z ${MLFLOW_HOST:-} && -f $DATA/head_address ]]; then
    MLFLOW_HOST=$(cat "$DATA/head_address")
fi
HOST=${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}
export RAY_AUTH_MODE=token  # the cluster's (scripts/cluster_node.sh): the token is ~/.ray/auth_token
cd "$HOME/mambalitesr"
exec "$HOME/venv/bin/python" search/run.py --address auto --tracking-uri "http://$HOST:5000" "$@"
