#!/usr/bin/env bash
# The paper's distillation-weight sweep on the CPU: the budget run (benchmarks/quality_cpu.sh) once
# per alpha, same seed and budget, evaluated whole-image in PyTorch (EVAL=pytorch) unless EVAL is set.
#   bash benchmarks/alpha_sweep.sh OUT_DIR [ALPHA ...]       (default alphas: 0 0.2 0.5 0.8 1.0)
#   ITERATIONS=500 bash benchmarks/alpha_sweep.sh outputs/sweep
# Leaves OUT_DIR/alpha_A/ per run (see quality_cpu.sh) and OUT_DIR/sweep.md, a table of PSNR-Y.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 ]]; then
    echo "usage: bash benchmarks/alpha_sweep.sh OUT_DIR [ALPHA ...]" >&2
    exit 2
fi
OUT=$1
shift
ALPHAS=("$@")
[[ ${#ALPHAS[@]} -gt 0 ]] || ALPHAS=(0 0.2 0.5 0.8 1.0)
export ITERATIONS=${ITERATIONS:-500} EVAL=${EVAL:-pytorch}
mkdir -p "$OUT"
for a in "${ALPHAS[@]}"; do
    status=0
    ALPHA=$a bash benchmarks/quality_cpu.sh "$OUT/alpha_$a" || status=$?
    # 3 is "ran, target missed": a result like any other here
    if [[ $status -ne 0 && $status -ne 3 ]]; then
        echo "error: the run with alpha $a failed (exit $status); see $OUT/alpha_$a/*.log" >&2
        exit 1
    fi
done
.venv/bin/python - "$OUT" "$ITERATIONS" "${ALPHAS[@]}" > "$OUT/sweep.md" <<'EOF'
import json, sys
out, iterations, alphas = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = [(a, json.load(open(f"{out}/alpha_{a}/summary.json"))) for a in alphas]
names = list(rows[0][1]["sets"])
print(f"alpha sweep, {iterations} iterations each, PSNR-Y (dB; margin over bicubic)\n")
print("| alpha | " + " | ".join(names) + " | train s |")
print("| --- |" + " --- |" * (len(names) + 1))
for a, s in rows:
    cells = [f"{s['sets'][n]['psnr_y']:.2f} ({s['sets'][n]['margin_db']:+.2f})" for n in names]
    print(f"| {a} | " + " | ".join(cells) + f" | {s['timings_s']['train']:.0f} |")
EOF
cat "$OUT/sweep.md"
