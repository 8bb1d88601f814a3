#!/usr/bin/env bash
# CPU quickstart on the built-in synthetic dataset (about 20 minutes on 2 cores):
#   data -> teacher r18_fpn_cpu -> ONE cache -> plain student and DeFeat student -> report.
# Every step is skipped when its output exists, so re-running resumes where it stopped.
# usage: bash pipeline/quickstart.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-out/quickstart}
# Batch 4 over 1200 images = 300 iterations per epoch. A distillation teacher should be the
# better-trained model: it gets the longer schedule; both students get the same shorter one.
TEACHER_EPOCHS=${QUICKSTART_TEACHER_EPOCHS:-4}
EPOCHS=${QUICKSTART_EPOCHS:-1.5}
SEED=${QUICKSTART_SEED:-0}
mkdir -p "$OUT"
# shellcheck source=pipeline/cpu_scale.sh
. "$(dirname "$0")/cpu_scale.sh"

step() { echo; echo "=== $* ==="; }

train() {  # name model epochs [extra train args...]
  local name=$1 model=$2 epochs=$3; shift 3
  if [ -f "$OUT/$name/final.pt" ]; then
    echo "$OUT/$name/final.pt exists; skipping training"
  else
    defeat-cache train --student "$model" --data "$DATA" --out "$OUT/$name" --epochs "$epochs" \
      --batch-size 4 --seed "$SEED" --resume "$@"
  fi
  if [ ! -f "$OUT/$name/eval.json" ]; then
    defeat-cache eval --checkpoint "$OUT/$name/final.pt" --data "$DATA" --json "$OUT/$name/eval.json"
  fi
}

step "1/5 synthetic dataset"
DATA=$(defeat-cache data shapes --out "$OUT/data")

step "2/5 teacher r18_fpn_cpu"
train teacher "$CPU_TEACHER" "$TEACHER_EPOCHS"

step "3/5 extract the teacher cache (once)"
defeat-cache extract --teacher "$CPU_TEACHER" --checkpoint "$OUT/teacher/final.pt" --data "$DATA" \
  --out "$OUT/cache.zarr" "${CPU_CACHE_ARGS[@]}" --codec fp16
defeat-cache inspect "$OUT/cache.zarr"

step "4/5 plain student r18q_fpn_cpu"
train student r18q_fpn_cpu "$EPOCHS"

step "5/5 DeFeat student r18q_fpn_cpu from the cache"
# defeat_cpu = the paper's recipe with neck weights scaled to these small models (docs/results.md)
train defeat r18q_fpn_cpu "$EPOCHS" --cache "$OUT/cache.zarr" --distill defeat_cpu

# the table (OUT/report/report.md, runs.csv) and the loss curves (OUT/report/losses.png) of the three runs
defeat-cache report "$OUT/teacher" "$OUT/student" "$OUT/defeat" --out "$OUT/report"
