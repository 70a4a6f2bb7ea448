#!/usr/bin/env bash
# Create .venv and install the project with its test tools. Safe to run again.
#   bash scripts/setup.sh           the project (what the smoke search needs)
#   bash scripts/setup.sh --tests   and the system packages the tests need (scripts/test_deps.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
tests=0
for arg in "$@"; do
    case "$arg" in
        --tests) tests=1 ;;
        *) echo "usage: bash scripts/setup.sh [--tests]  (unknown argument: $arg)" >&2; exit 2 ;;
    esac
done
if [ "$tests" -eq 1 ]; then
    bash scripts/test_deps.sh  # first: a missing package fails in seconds, not after the pip installs
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: a CPU wheel of 2.13.0 is available locally; a looser requirement can
# pull a multi-GB CUDA build.
#
# pip installs without byte-compiling; compileall then compiles the whole venv on every core (pip
# compiles one file at a time: 59 s of a 113 s setup on 2 cores, against 36 s this way). Compiled
# files matter where PYTHONDONTWRITEBYTECODE is set: Python then never caches what it compiles on
# import, and every process of the tests would compile torch, Ray and MLflow again.
.venv/bin/python -m pip install --quiet --no-compile "torch==2.13.0"
.venv/bin/python -m pip install --quiet --no-compile -e ".[dev]"
# Syne Tune's MOASHA, the LCBench benchmark's real peer (benchmarks/syne_moasha.py). Without its
# dependencies: MOASHA needs only numpy, pandas and dill, and the full list pulls xgboost, whose
# Linux wheel brings CUDA's NCCL.
.venv/bin/python -m pip install --quiet --no-compile --no-deps "syne-tune==0.16.0" "dill==0.4.1"
# a few files of some packages are not valid Python 3 (templates, test data): pip skips them too
.venv/bin/python -m compileall -q -j 0 .venv/lib > /dev/null || true
