#!/usr/bin/env bash
# Seed-to-seed spread of the quickstart: plain and DeFeat students for several seeds, all from
# the quickstart's ONE teacher and ONE cache (run pipeline/quickstart.sh OUT_DIR first).
# Resumable like the quickstart. Writes OUT_DIR/seeds_report/ (`defeat-cache report`: report.md, CSV, plots).
# usage: bash pipeline/seeds.sh [OUT_DIR] [SEEDS...]      (default seeds: 0 1 2)
set -euo pipefail
OUT=${1:-out/quickstart}
shift || true
SEEDS=${*:-0 1 2}
EPOCHS=${QUICKSTART_EPOCHS:-1.5}
DATA="$OUT/data/data.toml"
[ -f "$OUT/cache.zarr/zarr.json" ] || { echo "no $OUT/cache.zarr: run pipeline/quickstart.sh $OUT first" >&2; exit 1; }

run() {  # name seed [extra train args...]
  local name=$1 seed=$2; shift 2
  local dir="$OUT/seeds/$name-seed$seed"
  if [ "$seed" = 0 ] && [ -f "$OUT/$name/eval.json" ]; then  # the quickstart's own run is seed 0
    mkdir -p "$(dirname "$dir")"; ln -sfn "$(cd "$OUT/$name" && pwd)" "$dir"
  fi
  [ -f "$dir/final.pt" ] || defeat-cache train --student r18q_fpn_cpu --data "$DATA" --out "$dir" \
    --epochs "$EPOCHS" --batch-size 4 --seed "$seed" --resume "$@"
  [ -f "$dir/eval.json" ] || defeat-cache eval --checkpoint "$dir/final.pt" --data "$DATA" --json "$dir/eval.json"
}

runs=("$OUT/teacher")
for seed in $SEEDS; do
  echo "=== seed $seed ==="
  run student "$seed"
  run defeat "$seed" --cache "$OUT/cache.zarr" --distill defeat_cpu
  runs+=("$OUT/seeds/student-seed$seed" "$OUT/seeds/defeat-seed$seed")
done

# plain and DeFeat students over the seeds: mean ± sd per group, every run, the loss curves
defeat-cache report "${runs[@]}" --out "$OUT/seeds_report"
