#!/usr/bin/env bash
# A screenshot of a study's page in the MLflow UI, taken with headless Chromium, as in README.
#
#   bash scripts/screenshot_ui.sh DB OUT.png [EXPERIMENT]
#
# DB: the SQLite file a search wrote (e.g. mlflow.db after `search/run.py --smoke-test`);
# EXPERIMENT: its name (default mambalitesr-smoke). Shows the latest study run's page: its
# description (what was searched, the result, the champion and its models:/ URI), params and metrics;
# then checks, in the DOM the browser rendered, that the page shows the front's table and the
# champion's line without a click (exit 1 naming what is missing).
# Needs chromium (apt-get install chromium); starts an MLflow server on a free port and stops it.
set -euo pipefail
db=$(realpath "${1:?usage: screenshot_ui.sh DB OUT.png [EXPERIMENT]}")
out=$(realpath -m "${2:?usage: screenshot_ui.sh DB OUT.png [EXPERIMENT]}")
experiment=${3:-mambalitesr-smoke}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z $browser ]]; then
  echo "error: chromium is not installed (apt-get install chromium)" >&2
  exit 2
fi
[[ -f $db ]] || { echo "error: $db does not exist: run a search first" >&2; exit 2; }

port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
uri="http://127.0.0.1:$port"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false "$py" -m mlflow server --backend-store-uri "sqlite:///$db" --host 127.0.0.1 --port "$port" \
  >"${TMPDIR:-/tmp}/screenshot-mlflow.log" 2>&1 &
server=$!
trap 'pkill -P $server 2>/dev/null || true; kill $server 2>/dev/null || true' EXIT
for _ in $(seq 60); do
  curl -fs "$uri/health" >/dev/null 2>&1 && break
  sleep 1
done

read -r exp_id run_id < <("$py" - "$uri" "$experiment" <<'EOF'
import sys
from mlflow.tracking import MlflowClient

c = MlflowClient(sys.argv[1])
exp = c.get_experiment_by_name(sys.argv[2])
if exp is None:
    sys.exit(f"error: no experiment {sys.argv[2]!r} in that database")
runs = c.search_runs([exp.experiment_id], "tags.role = 'study'", order_by=["attributes.start_time DESC"], max_results=1)
if not runs:
    sys.exit(f"error: experiment {sys.argv[2]!r} has no study run")
print(exp.experiment_id, runs[0].info.run_id)
EOF
)
page="$uri/#/experiments/$exp_id/runs/$run_id?workflowType=machine_learning"
# --virtual-time-budget lets the single-page app fetch and render before the capture
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1500 \
  --virtual-time-budget=20000 --screenshot="$out" "$page" 2>/dev/null
echo "wrote $out (study run $run_id)"

# The check: the page as the browser rendered it, without a click, shows the front's table and the
# champion's line (the study description's "Result" and "Champion" sections).
dom="${TMPDIR:-/tmp}/screenshot-dom.html"
"$browser" --headless --no-sandbox --disable-gpu --virtual-time-budget=20000 --dump-dom "$page" >"$dom" 2>/dev/null
missing=()
grep -q '<table' "$dom" && grep -q 'val PSNR-Y (dB)' "$dom" || missing+=("the front's table")
grep -q '★ champion' "$dom" || missing+=("the champion's row")
grep -q 'over the runner-up' "$dom" || missing+=("what the champion trades against the runner-up")
grep -q 'mlflow.onnx.load_model' "$dom" || missing+=("the line that loads the champion")
if (( ${#missing[@]} )); then
  printf 'error: the study page, as rendered, lacks: %s (DOM in %s)\n' "$(IFS=';'; echo "${missing[*]}")" "$dom" >&2
  exit 1
fi
# MLflow 3.17 shows the first 150 px of a description before "Show more": the champion's line comes
# first and fits; the front's table is rendered below it, one click away (look at the screenshot)
echo "checked: the rendered study page holds the champion's line, the front's table and how to load the champion"
