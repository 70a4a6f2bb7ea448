#!/usr/bin/env bash
# What each node of a `ray up` cluster runs (ray_cluster.local.yaml, ray_cluster.yaml):
#
#   cluster_node.sh setup                 ~/venv with torch pinned first, then the project; ~/.bashrc
#                                         puts ~/venv/bin on PATH (Ray's commands run `ray` from it)
#   cluster_node.sh start-head            Ray's head (port 6379) and the MLflow server (port 5000),
#                                         both on this node's address; the cluster's Ray auth token
#   cluster_node.sh start-worker HEAD_IP  join the head (with the head's token)
#   cluster_node.sh stop                  the MLflow server (on the head) and Ray
#
# `ray down` runs `ray stop` on the head through a login shell; the `ray` function that `setup` adds
# to ~/.bashrc makes that stop the MLflow server too. This node's address is the one it was
# reached at over SSH (the address Ray's launcher knows it by), else its first address.
# torch: PyPI's Linux wheel is the CUDA build (several GB), right for GPU nodes. A node without
# nvidia-smi also looks in PyTorch's CPU index (pip takes 2.13.0+cpu from there, or from a wheel the
# node's own pip configuration offers). TORCH_INDEX_URL, when set, is the only index used for torch.
# pip installs without compiling every module to bytecode (--no-compile: over half of the install's
# time on a small node); Python compiles what the node imports, once, beside the sources. `ray up`
# runs `setup` at every start: pip runs only when pyproject.toml changed since the last install
# (the project is installed editable: changed sources need no reinstall).
# Ray token authentication, on for every node and every process of the cluster (RAY_AUTH_MODE=token,
# also in ~/.bashrc for what `ray exec` runs): `start-head` creates the token ~/.ray/auth_token
# (mode 0600) when the head has none, and the launcher copies it to each worker before the worker's
# commands run (the cluster files' `cluster_synced_files`). It never appears in a command line or
# a log; a process without it cannot join or use the cluster.
set -euo pipefail
export RAY_AUTH_MODE=token
TOKEN=$HOME/.ray/auth_token
VENV=$HOME/venv
REPO=$HOME/mambalitesr
TORCH_PIN=torch==2.13.0
DATA=${MLFLOW_DATA:-$HOME/mlflow}

node_ip() {
    if [[ -n ${SSH_CONNECTION:-} ]]; then
        awk '{print $3}' <<<"$SSH_CONNECTION"
    else
        hostname -I | awk '{print $1}'
    fi
}

is_local_address() {  # true when this machine has the address (a worker on the head's machine)
    "$VENV/bin/python" -c 'import socket, sys; socket.socket().bind((sys.argv[1], 0))' "$1" 2>/dev/null
}

ensure_token() {  # the head's: made once, kept across restarts of the cluster
    mkdir -p "$HOME/.ray"
    chmod 700 "$HOME/.ray"
    if [[ ! -s $TOKEN ]]; then
        (umask 077 && "$VENV/bin/python" -c \
            'import secrets, sys; open(sys.argv[1], "w").write(secrets.token_hex(32))' "$TOKEN.new")
        mv "$TOKEN.new" "$TOKEN"
        echo "created the cluster's Ray auth token ($TOKEN)"
    fi
    chmod 600 "$TOKEN"
}

stop_mlflow() {
    local pid_file=$DATA/server.pid
    [[ -f $pid_file ]] || return 0
    local pid
    pid=$(cat "$pid_file")
    # the server leads its own session (setsid): its group holds the workers and the job runner
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 20); do
        kill -0 -- "-$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pid_file"
    echo "stopped the MLflow server (process group $pid)"
}

case "${1:-}" in
    setup)
        [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
        want="$TORCH_PIN $(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
        stamp=$VENV/.mambalitesr-installed
        if [[ -f $stamp && $(cat "$stamp") == "$want" && -x $VENV/bin/ray ]]; then
            echo "the node's venv already holds what pyproject.toml asks for ($VENV)"
        else
            rm -f "$stamp"
            "$VENV/bin/python" -m pip install --quiet --upgrade pip
            if [[ -n ${TORCH_INDEX_URL:-} ]]; then
                torch_from=(--index-url "$TORCH_INDEX_URL")
            elif ! command -v nvidia-smi >/dev/null; then
                torch_from=(--extra-index-url https://download.pytorch.org/whl/cpu)
            else
                torch_from=()
            fi
            "$VENV/bin/python" -m pip install --quiet --no-compile "${torch_from[@]}" "$TORCH_PIN"
            "$VENV/bin/python" -m pip install --quiet --no-compile -e "$REPO"
            echo "$want" >"$stamp"
        fi
        if ! grep -q "mambalitesr cluster node" "$HOME/.bashrc" 2>/dev/null; then
            cat >>"$HOME/.bashrc" <<'EOF'
# mambalitesr cluster node (scripts/cluster_node.sh): Ray's commands find ray here, and
# `ray stop` (what `ray down` runs on the head) stops the MLflow server first
export PATH="$HOME/venv/bin:$PATH"
export RAY_AUTH_MODE=token
ray() {
    if [ "${1:-}" = stop ]; then bash "$HOME/mambalitesr/scripts/cluster_node.sh" stop-mlflow; fi
    command ray "$@"
}
EOF
        fi
        ;;
    start-head)
        ip=$(node_ip)
        "$VENV/bin/ray" stop
        stop_mlflow
        ensure_token
        # Ray 2.60's v2 autoscaler, on by default, started no worker of the local provider (in
        # tests/test_ray_up.py it allocated the head alone); the v1 autoscaler starts them
        # (and it runs ssh with host-key checking off: scripts/verified_ssh/ssh puts it back)
        PATH="$REPO/scripts/verified_ssh:$PATH" RAY_enable_autoscaler_v2=0 "$VENV/bin/ray" start --head --node-ip-address="$ip" --port=6379 \
            --autoscaling-config="$HOME/ray_bootstrap_config.yaml" --include-dashboard=false
        mkdir -p "$DATA"
        echo "$ip" >"$DATA/head_address"
        MLFLOW_HOST=$ip bash "$REPO/scripts/start_mlflow.sh"
        ;;
    start-worker)
        head=${2:?usage: cluster_node.sh start-worker HEAD_IP}
        ip=$(node_ip)
        if [[ ! -s $TOKEN ]]; then
            echo "error: no Ray auth token at $TOKEN: the launcher copies the head's there" \
                "(cluster_synced_files: [~/.ray/auth_token] in the cluster file)" >&2
            exit 1
        fi
        # a stale Ray of an earlier cluster goes first, unless this machine is the head's as well
        # (two nodes on one machine, as in tests/test_ray_up.py): `ray stop` would stop the head
        is_local_address "$head" || "$VENV/bin/ray" stop
        "$VENV/bin/ray" start --address="$head:6379" --node-ip-address="$ip"
        ;;
    stop-mlflow)
        stop_mlflow
        ;;
    stop)
        stop_mlflow
        "$VENV/bin/ray" stop
        ;;
    *)
        echo "usage: cluster_node.sh setup | start-head | start-worker HEAD_IP | stop" >&2
        exit 2
        ;;
esac
