#!/usr/bin/env bash
# How our scheduler's defaults were chosen (docs/benchmarks.md, "Choosing the scheduler's
# defaults"): variants of its rule against no stopping and MOASHA, random search, 5 tasks x 4 seeds.
#   bash benchmarks/lcbench_sweep.sh [OUT]        (about 40 minutes on 2 CPUs)
set -euo pipefail
out=${1:-outputs/lcbench_sweep}
py=${PYTHON:-python}
common=(--tasks 3945 7593 34539 126025 126026 --seeds 4 --trials 60 --searchers random --out "$out")
"$py" -m benchmarks.bench_lcbench "${common[@]}" --schedulers none,moasha,pareto   # pareto: the default
for variant in "min_rung=1" "min_rung=1 rung_factor=2" "min_rung=1 rung_factor=3" "min_rung=1 margin=1" \
    "rung_factor=2" "margin=2" "min_rung=4" "min_rung=4 rung_factor=2" "min_rung=4 margin=3" \
    "min_rung=9 rung_factor=3"; do
  # shellcheck disable=SC2086
  "$py" -m benchmarks.bench_lcbench "${common[@]}" --schedulers pareto --pareto $variant
done
"$py" -m benchmarks.bench_lcbench "${common[@]}" --report-only --baseline moasha --baseline-searcher random
