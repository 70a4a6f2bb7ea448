#!/usr/bin/env bash
# A real study on this machine's CPU, end to end, beside the models it has to beat (the paper's hand
# pick, convolutional nets, bicubic), all measured by the same agent on the same device; then every
# model on Set5, Set14 and BSD100 through 64x64 tiles in ONNX Runtime. benchmarks/real_study.py
# says what each stage does; OUT/summary.json and OUT/front.png hold the result.
#
#   bash benchmarks/real_study.sh OUT                          # again with the same OUT: continues
#   TRAIN_DATA=PHOTOS VAL_IMAGES=10 BENCH=DIR bash benchmarks/real_study.sh OUT
#
# Knobs (environment): CONFIG (default search/configs/cpu.yaml), TRAIN_DATA (a folder of photos; the
# last VAL_IMAGES by name are held out for validation), BENCH (the folder holding Set5, Set14,
# BSD100), TEACHER (default: ../shared's copy of DVMSR's weights, else the pinned download).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/real_study.sh OUT" >&2
    exit 2
fi
PY=.venv/bin/python
[[ -x $PY ]] || { echo "error: $PY not found; run: bash scripts/setup.sh" >&2; exit 2; }
ARGS=(--out "$1")
[[ -n ${CONFIG:-} ]] && ARGS+=(--config "$CONFIG")
[[ -n ${TRAIN_DATA:-} ]] && ARGS+=(--train-data "$TRAIN_DATA")
[[ -n ${VAL_IMAGES:-} ]] && ARGS+=(--val-images "$VAL_IMAGES")
[[ -n ${BENCH:-} ]] && ARGS+=(--bench "$BENCH")
SHARED_TEACHER=../shared/models/dvmsr/team07_DVMSR.pth
if [[ -z ${TEACHER:-} && -f $SHARED_TEACHER ]]; then TEACHER="dvmsr:$SHARED_TEACHER"; fi
[[ -n ${TEACHER:-} ]] && ARGS+=(--teacher "$TEACHER")
exec "$PY" -m benchmarks.real_study "${ARGS[@]}"
