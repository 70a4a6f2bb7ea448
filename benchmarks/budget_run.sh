#!/usr/bin/env bash
# A budgeted quality run on the CPU: a teacher, then a student distilled from it, trained on BSD100
# from ../shared, evaluated on Set5 and Set14 beside bicubic. Wall times are printed per stage.
#   bash benchmarks/budget_run.sh [OUT_DIR] [TEACHER_ITERS] [STUDENT_ITERS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/budget}
T_ITERS=${2:-200}
S_ITERS=${3:-700}
BENCH=../shared/data/sr-benchmarks
PY=.venv/bin/python
COMMON=(--batch-size 4 --patch-size 32 --lr 1e-3 --val-every 100 --train-data "$BENCH/BSD100" --val-data "$BENCH/Set5")
start=$(date +%s)
$PY -m trainers.train --role teacher --preset teacher --iterations "$T_ITERS" "${COMMON[@]}" --out-dir "$OUT/teacher" --json "$OUT/teacher.json" > "$OUT.teacher.log" 2>&1
t_done=$(date +%s)
$PY -m trainers.train --role student --teacher "$OUT/teacher/last.pt" --alpha 0.5 --iterations "$S_ITERS" "${COMMON[@]}" --out-dir "$OUT/student" --json "$OUT/student.json" > "$OUT.student.log" 2>&1
s_done=$(date +%s)
echo "teacher: $T_ITERS steps in $((t_done - start)) s; student: $S_ITERS steps in $((s_done - t_done)) s"
for m in bicubic "$OUT/teacher/last.pt" "$OUT/student/last.pt"; do
    $PY -m trainers.evaluate --model "$m" --data "$BENCH/Set5" "$BENCH/Set14"
done
