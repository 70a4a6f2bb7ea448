#!/usr/bin/env bash
# Start the MLflow tracking server on the Ray head, bound to MLFLOW_HOST (default: this machine's
# first address), port 5000, SQLite backend, artifacts served by the server so remote workers can
# read and write them. The server leads its own session; its id goes to $DATA/server.pid so that
# `scripts/cluster_node.sh stop` (and `ray down`) stop it with its workers. MLflow's job runner
# (for its GenAI features, which the project does not use) stays off: seven fewer processes, about
# 2 GB less memory on the head.
#
# Authentication: the server runs MLflow's basic-auth app, so nobody on the network reaches it
# without the cluster's MLflow password. The first start makes that password and writes it to
# ~/.mlflow/credentials (mode 0600), the file every MLflow client of this user reads (username and
# password, never in a URI): the launcher copies it to the workers (the cluster files'
# `cluster_synced_files`), so trials and the search log in without a flag. A workstation or an
# edge device copies it too (README). MLFLOW_AUTH=none starts the server without authentication,
# for a network only the cluster reaches.
set -euo pipefail
HOST=${MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}
DATA=${MLFLOW_DATA:-$HOME/mlflow}
MLFLOW=${MLFLOW:-$HOME/venv/bin/mlflow}
PYTHON=$(dirname "$MLFLOW")/python
CREDENTIALS=$HOME/.mlflow/credentials
AUTH=${MLFLOW_AUTH:-basic}
mkdir -p "$DATA"
if curl -s -o /dev/null "http://$HOST:5000/health"; then
    echo "MLflow already serving at http://$HOST:5000"
    exit 0
fi
auth_args=()
case "$AUTH" in
    basic)
        # the credentials (made once, kept across restarts: the auth database holds the user) and
        # the server's auth config beside its data, both owner-only; nothing printed
        (umask 077 && mkdir -p "$(dirname "$CREDENTIALS")" "$DATA" && "$PYTHON" - "$CREDENTIALS" "$DATA" <<'EOF'
import configparser, os, secrets, sys
credentials, data = sys.argv[1], sys.argv[2]
user = configparser.ConfigParser()
user.read(credentials)
if not user.has_option("mlflow", "mlflow_tracking_password"):
    user["mlflow"] = {"mlflow_tracking_username": "mambalitesr", "mlflow_tracking_password": secrets.token_hex(24)}
    with open(credentials + ".new", "w") as f:
        user.write(f)
    os.replace(credentials + ".new", credentials)
    print(f"created the cluster's MLflow credentials ({credentials})")
server = configparser.ConfigParser()
server["mlflow"] = {
    "default_permission": "READ",
    "database_uri": f"sqlite:///{data}/basic_auth.db",
    "admin_username": user["mlflow"]["mlflow_tracking_username"],
    "admin_password": user["mlflow"]["mlflow_tracking_password"],
    "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
}
with open(f"{data}/basic_auth.ini", "w") as f:
    server.write(f)
if not os.path.exists(f"{data}/flask_secret"):  # the auth app's CSRF key, the same at every start
    with open(f"{data}/flask_secret", "w") as f:
        f.write(secrets.token_hex(32))
EOF
        )
        chmod 600 "$CREDENTIALS" "$DATA/basic_auth.ini" "$DATA/flask_secret"
        export MLFLOW_AUTH_CONFIG_PATH=$DATA/basic_auth.ini
        MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$DATA/flask_secret")
        export MLFLOW_FLASK_SERVER_SECRET_KEY
        auth_args=(--app-name basic-auth)
        ;;
    none) ;;
    *)
        echo "error: MLFLOW_AUTH must be basic or none, got '$AUTH'" >&2
        exit 2
        ;;
esac
# MLflow refuses requests whose Host header is not localhost or a private address (DNS-rebinding
# protection): the head's own address, whatever it is, and the tunnel's localhost are allowed
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid nohup "$MLFLOW" server --host "$HOST" --port 5000 \
    "${auth_args[@]}" \
    --allowed-hosts "$HOST,$HOST:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*" \
    --backend-store-uri "sqlite:///$DATA/mlflow.db" --artifacts-destination "$DATA/artifacts" \
    > "$DATA/server.log" 2>&1 < /dev/null &
echo $! > "$DATA/server.pid"
for _ in $(seq 60); do
    # any HTTP answer: with basic-auth, an unauthenticated /health may be refused (401)
    curl -s -o /dev/null "http://$HOST:5000/health" && { echo "MLflow at http://$HOST:5000/#/?workflowType=machine_learning (auth: $AUTH; the link's ?workflowType opens the model-training view, not GenAI)"; exit 0; }
    sleep 1
done
echo "MLflow did not start; see $DATA/server.log" >&2
exit 1
