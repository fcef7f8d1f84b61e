#!/usr/bin/env bash
# One-GPU check (no network, PyTorch only): environment report, correctness smoke tests on CUDA, bf16 matmul
# TFLOP/s and the step benchmark, written to OUT_DIR/gpu_check.{md,json}. Under 8 minutes.
#   bash scripts/gpu_check.sh OUT_DIR                  # PYTHON=... to pick the interpreter
#   bash scripts/gpu_check.sh OUT_DIR --cpu-dry-run    # the code paths on a CPU, tiny sizes
# Exit 0: correctness checks passed; 1: one failed; 3: no CUDA device; 124: hit the 8-minute cap (the report
# holds every check finished before that).
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_check.sh OUT_DIR [--cpu-dry-run]" >&2
  exit 2
fi
OUT=$1
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# A Python without the project installed (a bare GPU machine) imports it from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
timeout -k 15 470 "$PYTHON" scripts/gpu_check.py "$OUT" "$@" || status=$?
[ "$status" = 124 ] && echo "gpu_check: stopped at the 8-minute cap; partial report in $OUT/gpu_check.md" >&2
exit "$status"
