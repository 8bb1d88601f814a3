#!/usr/bin/env bash
# Methods and ablations at CPU scale: ONE teacher, ONE cache (the quickstart's: QUICKSTART/teacher/final.pt,
# QUICKSTART/cache.zarr; pipeline/quickstart.sh is run first if they are absent; Table 1's "+ backbone"
# row alone reads OUT/cache_backbone.zarr, the same teacher's cache with backbone stages), many r18q_fpn_cpu
# students on the quickstart's schedule (same epochs, batch 4). Pieces, each runnable alone:
#   methods    plain, defeat_cpu, fgd, mgd_cpu, pkd_cpu, cwd_cpu, PKD + DeFeat cls; seeds 0 1 2
#   ablations  the paper's Table 1 rows, Table 4 masks, Table 5 cls rows (decoupled and all-cls forms),
#              Table 6 (student proposals), obj-only vs bg-only neck; seeds 0 1
#   table      `defeat-cache report` over every finished run: OUT/report/ (report.md: mean ± sd per group;
#              tables.md: the paper's tables, as in docs/results.md)
# Every run goes to OUT/runs/NAME-seedS (a run shared by two pieces is trained once), is skipped when its
# eval.json exists, and an interrupted one continues from its last.pt (--resume).
# usage: bash pipeline/tables.sh [OUT] [PIECE...]      (default: out/tables methods ablations table)
# Smaller (for checking the script): TABLES_EPOCHS, TABLES_MAX_ITERS (passed as --max-iters),
# TABLES_METHOD_SEEDS ("0 1 2"), TABLES_ABLATION_SEEDS ("0 1").
set -euo pipefail
OUT=${1:-out/tables}
shift || true
PIECES=${*:-methods ablations table}
QS=${QUICKSTART:-out/quickstart}
EPOCHS=${TABLES_EPOCHS:-${QUICKSTART_EPOCHS:-1.5}}
METHOD_SEEDS=${TABLES_METHOD_SEEDS:-0 1 2}
ABLATION_SEEDS=${TABLES_ABLATION_SEEDS:-0 1}
DATA="$QS/data/data.toml"
CACHE="$QS/cache.zarr"
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=pipeline/cpu_scale.sh
. "$here/cpu_scale.sh"
started=$(date +%s)
for piece in $PIECES; do
  case $piece in methods|ablations|table) ;; *) echo "unknown piece '$piece' (pieces: methods ablations table)" >&2; exit 2;; esac
done

if [ "$PIECES" != table ] && { [ ! -f "$QS/teacher/final.pt" ] || [ ! -f "$CACHE/zarr.json" ]; }; then
  echo "no $QS/teacher/final.pt or $CACHE: running pipeline/quickstart.sh $QS first"
  bash "$here/quickstart.sh" "$QS"
fi
mkdir -p "$OUT/runs"

# CPU scale, chosen as defeat_cpu was (docs/results.md): the paper's neck (and backbone) imitation
# weights divided by 10, so every ablation row is comparable to defeat_cpu; the cls KD weights and
# the authors' FGD weights are unchanged; PKD's weight as in pkd_cpu (6 -> 0.8).
CPU_NECK="--set neck.alpha_obj=0.4 --set neck.alpha_bg=1.6"
KD="--cache $CACHE --distill"

RUNS=()   # "NAME SEED TRAIN-ARGS..." of the pieces asked for, each run once
PIECE=()  # the same for the piece being listed (a run shared with an earlier piece counted in both)
add() {  # name "seeds" [train args...]
  local name=$1 seeds=$2 seed spec known; shift 2
  for seed in $seeds; do
    spec="$name $seed $*"
    PIECE+=("$spec")
    for known in "${RUNS[@]}"; do [ "$known" = "$spec" ] && continue 2; done
    RUNS+=("$spec")
  done
}
count() {  # label spec...: how many of the runs are done
  local label=$1 done=0 spec name seed; shift
  for spec in "$@"; do
    read -r name seed _ <<< "$spec"
    [ -f "$OUT/runs/$name-seed$seed/eval.json" ] && done=$((done + 1))
  done
  echo "$label: $# runs, $done done"
}

# Table 1's "+ backbone" row needs the teacher's backbone stages, which the quickstart's cache leaves out
# (they add ~60%: 1.26 GB against 0.77 GB here). That row reads a second cache of the SAME teacher, same
# settings plus --backbone (extract skips a cache that is already complete); every other row reads $CACHE.
BACKBONE_CACHE=$CACHE
if [[ " $PIECES " == *" ablations "* ]] && [ "$(defeat-cache inspect "$CACHE" --json | python -c \
    "import json, sys; print(1 if json.load(sys.stdin)['manifest']['layout'].get('backbone_levels') else 0)")" = 0 ]; then
  BACKBONE_CACHE="$OUT/cache_backbone.zarr"
  echo "$CACHE holds no backbone features: extracting $BACKBONE_CACHE for Table 1's '+ backbone' row"
  defeat-cache extract --teacher "$CPU_TEACHER" --checkpoint "$QS/teacher/final.pt" --data "$DATA" \
    --out "$BACKBONE_CACHE" "${CPU_CACHE_ARGS[@]}" --codec fp16 --backbone
fi
for piece in $PIECES; do
  PIECE=()
  case $piece in
    methods)
      add plain "$METHOD_SEEDS"
      add defeat_cpu "$METHOD_SEEDS" $KD defeat_cpu
      add fgd "$METHOD_SEEDS" $KD fgd
      add mgd_cpu "$METHOD_SEEDS" $KD mgd_cpu
      add pkd_cpu "$METHOD_SEEDS" $KD pkd_cpu
      add cwd_cpu "$METHOD_SEEDS" $KD cwd_cpu
      add pkd_cls_decoupled_cpu "$METHOD_SEEDS" $KD pkd_cls_decoupled --set pkd.weight=0.8
      ;;
    ablations)
      add plain "$ABLATION_SEEDS"
      # Table 1: all-neck, decoupled-neck, + all-cls, + decoupled-cls (= DeFeat), + backbone
      add neck_all_cpu "$ABLATION_SEEDS" $KD neck_all --set neck.alpha_obj=1.6
      add neck_decoupled_cpu "$ABLATION_SEEDS" $KD neck_decoupled $CPU_NECK
      add neck_decoupled_cls_all_cpu "$ABLATION_SEEDS" $KD neck_decoupled_cls_all $CPU_NECK
      add defeat_cpu "$ABLATION_SEEDS" $KD defeat_cpu
      add defeat_backbone_cpu "$ABLATION_SEEDS" --cache "$BACKBONE_CACHE" --distill defeat_backbone $CPU_NECK \
        --set backbone.alpha_obj=0.4 --set backbone.alpha_bg=1.6
      # Table 4: object-only imitation under each mask (GT-Mask: neck_obj)
      add neck_obj_cpu "$ABLATION_SEEDS" $KD neck_obj --set neck.alpha_obj=0.4
      add mask_fgfi_obj_cpu "$ABLATION_SEEDS" $KD mask_fgfi_obj --set neck.alpha_obj=0.4
      add mask_gaussian_obj_cpu "$ABLATION_SEEDS" $KD mask_gaussian_obj --set neck.alpha_obj=0.4
      add mask_random_obj_cpu "$ABLATION_SEEDS" $KD mask_random_obj --set neck.alpha_obj=0.4
      # object-only vs background-only neck (object-only: neck_obj above)
      add neck_bg_cpu "$ABLATION_SEEDS" $KD neck_bg --set neck.alpha_bg=1.6
      # Table 5: RoI-classifier KD on positives only, negatives only, decoupled (no neck: weights as defeat_cpu's)
      add cls_pos "$ABLATION_SEEDS" $KD cls_pos
      add cls_neg "$ABLATION_SEEDS" $KD cls_neg
      add cls_decoupled "$ABLATION_SEEDS" $KD cls_decoupled
      # ... and in the all-cls form (paper Eq. 2: lam x mean KL, one temperature; lam = 1, T = 1): over
      # every sampled RoI, the positives only, the negatives only, the positives + as many negatives
      add cls_all "$ABLATION_SEEDS" $KD cls_all
      add cls_all_pos "$ABLATION_SEEDS" $KD cls_all_pos
      add cls_all_neg "$ABLATION_SEEDS" $KD cls_all_neg
      add cls_all_subneg "$ABLATION_SEEDS" $KD cls_all_subneg
      # Table 6: the decoupled cls KD at the student's proposals, scored by the teacher's box head alone
      # on the cached features (against cls_decoupled: the teacher's proposals)
      add cls_student_rois "$ABLATION_SEEDS" $KD cls_student_rois --teacher-head "$QS/teacher/final.pt"
      ;;
  esac
  [ "$piece" = table ] || count "$piece" "${PIECE[@]}"
done
[ ${#RUNS[@]} = 0 ] || count "all pieces (shared runs once)" "${RUNS[@]}"

extra=()
[ -z "${TABLES_MAX_ITERS:-}" ] || extra=(--max-iters "$TABLES_MAX_ITERS")
for spec in "${RUNS[@]}"; do
  read -r name seed args <<< "$spec"
  dir="$OUT/runs/$name-seed$seed"
  [ -f "$dir/eval.json" ] && continue
  echo; echo "=== $name seed $seed ($(date -u +%H:%M:%S) UTC) ==="
  t0=$(date +%s)
  # shellcheck disable=SC2086  # args: the run's own options, word-split on purpose
  [ -f "$dir/final.pt" ] || defeat-cache train --student r18q_fpn_cpu --data "$DATA" --out "$dir" --epochs "$EPOCHS" \
    --batch-size 4 --seed "$seed" --resume --checkpoint-minutes 2 "${extra[@]}" $args
  defeat-cache eval --checkpoint "$dir/final.pt" --data "$DATA" --json "$dir/eval.json"
  echo "$name seed $seed: $(($(date +%s) - t0)) s"
done

if [[ " $PIECES " == *" table "* ]]; then
  finished=("$QS/teacher")
  for dir in "$OUT"/runs/*-seed*; do [ -f "$dir/eval.json" ] && finished+=("$dir"); done
  # every finished run, grouped by what it computes: mean ± sd over the seeds, loss curves
  defeat-cache report "${finished[@]}" --out "$OUT/report"
  python "$here/tables_md.py" "$OUT"  # the same runs as docs/results.md's tables: OUT/report/tables.md
fi
echo "total time: $(($(date +%s) - started)) s"
