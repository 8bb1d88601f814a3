#!/usr/bin/env bash
# CPU quickstart on the built-in synthetic dataset: teacher -> plain student, evaluated.
# Every step is skipped when its output exists, so re-running resumes.
# usage: bash pipeline/quickstart.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-out/quickstart}
ITERS=${QUICKSTART_ITERS:-800}
mkdir -p "$OUT"
here=$(cd "$(dirname "$0")" && pwd)

step() { echo; echo "=== $* ==="; }

step "1/3 synthetic dataset"
DATA=$(defeat-cache data shapes --out "$OUT/data")

train() {  # name model [extra args...]
  local name=$1 model=$2; shift 2
  if [ ! -f "$OUT/$name/final.pt" ]; then
    defeat-cache train --student "$model" --data "$DATA" --out "$OUT/$name" --epochs 100 \
      --max-iters "$ITERS" --batch-size 4 --seed 0 --resume "$@"
  else
    echo "$OUT/$name/final.pt exists; skipping"
  fi
  if [ ! -f "$OUT/$name/eval.json" ]; then
    defeat-cache eval --checkpoint "$OUT/$name/final.pt" --data "$DATA" --json "$OUT/$name/eval.json"
  fi
}

step "2/3 teacher r18_fpn_cpu"
train teacher r18_fpn_cpu

step "3/3 plain student r18q_fpn_cpu"
train student r18q_fpn_cpu

python "$here/results_table.py" "$OUT" teacher="$OUT/teacher" student="$OUT/student"
