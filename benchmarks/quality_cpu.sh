#!/usr/bin/env bash
# The CPU budget run: distil the `student` preset from DVMSR's published weights, starting from
# them (model/inherit.py: the student takes the teacher's topology, 141,008 parameters), on
# ../shared/data/train/SunHays80 (HR only, degraded on the fly by MATLAB-style bicubic), export it
# as the device runs it (ONNX, static 1x3x64x64; float32 on a CPU, so no float16 check), and
# evaluate it through 64x64 tiles in ONNX Runtime on Set5, Set14 and BSD100 beside bicubic.
# Target: every set at least 0.3 dB above bicubic, in at most 30 minutes on 2 CPU cores after
# setup (bash scripts/setup.sh).
#
#   bash benchmarks/quality_cpu.sh OUT_DIR
#   ITERATIONS=600 ALPHA=0.2 bash benchmarks/quality_cpu.sh OUT_DIR    # the alpha sweep's runs
#
# Knobs (environment): ITERATIONS, ALPHA, SEED, LR, BATCH, PATCH; PRESET (the student's model
# preset, default student); INIT (teacher, the default: the student starts from the teacher's
# weights; or scratch); TEACHER (default: DVMSR's weights from ../shared, else the pinned download);
# TRAIN_DATA and BENCH (folders); EVAL=onnx (default: the device's path, 64x64 tiles in ONNX
# Runtime) or EVAL=pytorch (whole images, no export: quicker, for sweeps). Leaves in OUT_DIR:
# student.pt, student.onnx (EVAL=onnx), student_eval.json, bicubic_eval.json, summary.json, and a
# log per stage.
# Exit status: 0 target met, 3 target missed, anything else a stage failed (its log says why).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/quality_cpu.sh OUT_DIR" >&2
    exit 2
fi
OUT=$1
ITERATIONS=${ITERATIONS:-1400}
ALPHA=${ALPHA:-0.5}
SEED=${SEED:-0}
LR=${LR:-2e-3}
BATCH=${BATCH:-16}
PATCH=${PATCH:-32}
PRESET=${PRESET:-student}
INIT=${INIT:-teacher}
EVAL=${EVAL:-onnx}
TRAIN_DATA=${TRAIN_DATA:-../shared/data/train/SunHays80}
BENCH=${BENCH:-../shared/data/sr-benchmarks}
PY=.venv/bin/python
SHARED_TEACHER=../shared/models/dvmsr/team07_DVMSR.pth
if [[ -z "${TEACHER:-}" ]]; then
    if [[ -f $SHARED_TEACHER ]]; then TEACHER="dvmsr:$SHARED_TEACHER"; else TEACHER=dvmsr; fi
fi

[[ $EVAL == onnx || $EVAL == pytorch ]] || { echo "error: EVAL must be onnx or pytorch, got '$EVAL'" >&2; exit 2; }
[[ -x $PY ]] || { echo "error: $PY not found; run: bash scripts/setup.sh" >&2; exit 2; }
for d in "$TRAIN_DATA" "$BENCH/Set5" "$BENCH/Set14" "$BENCH/BSD100"; do
    [[ -d $d ]] || { echo "error: $d not found; set TRAIN_DATA / BENCH to your copies" >&2; exit 2; }
done
mkdir -p "$OUT"
SETS=("$BENCH/Set5" "$BENCH/Set14" "$BENCH/BSD100")

stage() {  # stage NAME COMMAND...: run it with its output in OUT/NAME.log, and time it
    local name=$1 t0
    shift
    t0=$(date +%s)
    echo "[$(date +%T)] $name: $*"
    if ! "$@" > "$OUT/$name.log" 2>&1; then
        echo "error: stage $name failed; the end of $OUT/$name.log:" >&2
        tail -n 20 "$OUT/$name.log" >&2
        exit 1
    fi
    TIMINGS+=("\"$name\": $(( $(date +%s) - t0 ))")
}
TIMINGS=()
START=$(date +%s)

# Validation is Set5, whole image, four times in the run: the curve in train.log. The checkpoint
# evaluated is the last one, never the best on Set5, so Set5 is not used to choose anything.
# alpha 0 is plain L1 to HR: no teacher (trainers.train refuses one it would not use)
TEACHER_ARGS=(--teacher "$TEACHER")
[[ $ALPHA =~ ^0*\.?0*$ && $INIT != teacher ]] && TEACHER_ARGS=()
stage train "$PY" -m trainers.train --role student --preset "$PRESET" "${TEACHER_ARGS[@]}" \
    --init "$INIT" --alpha "$ALPHA" --lr "$LR" --batch-size "$BATCH" --patch-size "$PATCH" \
    --iterations "$ITERATIONS" --val-every $(( (ITERATIONS + 3) / 4 )) --log-every 50 --seed "$SEED" \
    --train-data "$TRAIN_DATA" --val-data "$BENCH/Set5" --out-dir "$OUT/train" --json "$OUT/train.json"
cp "$OUT/train/last.pt" "$OUT/student.pt"
VAL_PSNR=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['val_psnr_y'])" "$OUT/train.json")

if [[ $EVAL == onnx ]]; then
    stage export "$PY" -m model.export --checkpoint "$OUT/student.pt" --out "$OUT/student.onnx" \
        --quality-db "$VAL_PSNR" --seed "$SEED" --no-fp16 --json "$OUT/export.json"
    MODEL=$OUT/student.onnx
else
    MODEL=$OUT/student.pt
fi
stage evaluate "$PY" -m trainers.evaluate --model "$MODEL" --data "${SETS[@]}" --json "$OUT/student_eval.json"
stage bicubic "$PY" -m trainers.evaluate --model bicubic --data "${SETS[@]}" --json "$OUT/bicubic_eval.json"
TIMINGS+=("\"total\": $(( $(date +%s) - START ))")
(IFS=,; echo "{${TIMINGS[*]}}") > "$OUT/timings.json"

set +e
"$PY" -m benchmarks.quality_report --model "$OUT/student_eval.json" --baseline "$OUT/bicubic_eval.json" \
    --margin-db 0.3 --timings "$OUT/timings.json" --out "$OUT/summary.json" | tee "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
