#!/usr/bin/env bash
# AP per codec: DeFeat students from the quickstart's fp16 cache and from compact caches at
# several steps, seeds 0-2 each, all from the quickstart's ONE teacher (run pipeline/quickstart.sh
# OUT_DIR first). Resumable: every step is skipped when its output exists. Writes
# OUT_DIR/codecs.{json,md} (pipeline/codec_table.py: AP and cache sizes) and OUT_DIR/codecs_report/
# (`defeat-cache report`: the runs grouped by codec, loss curves).
# usage: bash pipeline/codec_seeds.sh [OUT_DIR] [STEP ...]      (default steps: 2 3)
set -euo pipefail
OUT=${1:-out/quickstart}
shift || true
STEPS=${*:-2 3}
SEEDS=${CODEC_SEEDS:-0 1 2}
EPOCHS=${QUICKSTART_EPOCHS:-1.5}
DATA="$OUT/data/data.toml"
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=pipeline/cpu_scale.sh
. "$here/cpu_scale.sh"
[ -f "$OUT/teacher/final.pt" ] || { echo "no $OUT/teacher/final.pt: run pipeline/quickstart.sh $OUT first" >&2; exit 1; }

student() {  # dir cache seed
  local dir=$1 cache=$2 seed=$3
  [ -f "$dir/final.pt" ] || defeat-cache train --student r18q_fpn_cpu --data "$DATA" --out "$dir" --epochs "$EPOCHS" \
    --batch-size 4 --seed "$seed" --resume --cache "$cache" --distill defeat_cpu
  [ -f "$dir/eval.json" ] || defeat-cache eval --checkpoint "$dir/final.pt" --data "$DATA" --json "$dir/eval.json"
}

for seed in $SEEDS; do  # fp16: the quickstart's cache; seed 0 is the quickstart's own DeFeat run
  dir="$OUT/seeds/defeat-seed$seed"
  if [ "$seed" = 0 ] && [ -f "$OUT/defeat/eval.json" ]; then mkdir -p "$OUT/seeds"; ln -sfn "$(cd "$OUT/defeat" && pwd)" "$dir"; fi
  student "$dir" "$OUT/cache.zarr" "$seed"
done
for step in $STEPS; do
  cache="$OUT/cache_compact$step.zarr"
  defeat-cache extract --teacher "$CPU_TEACHER" --checkpoint "$OUT/teacher/final.pt" --data "$DATA" --out "$cache" \
    "${CPU_CACHE_ARGS[@]}" --codec compact --compact-step "$step"
  [ -f "$OUT/inspect_compact$step.json" ] || defeat-cache inspect "$cache" --json > "$OUT/inspect_compact$step.json"
  for seed in $SEEDS; do student "$OUT/compact$step/defeat-seed$seed" "$cache" "$seed"; done
done
[ -f "$OUT/inspect_fp16.json" ] || defeat-cache inspect "$OUT/cache.zarr" --json > "$OUT/inspect_fp16.json"
python "$here/codec_table.py" "$OUT" $STEPS
runs=("$OUT"/seeds/defeat-seed*)
for step in $STEPS; do runs+=("$OUT/compact$step"/defeat-seed*); done
defeat-cache report "${runs[@]}" --out "$OUT/codecs_report"  # the same runs grouped by codec, and their curves
