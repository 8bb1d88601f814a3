#!/usr/bin/env bash
# GPU readiness check: every CUDA path of the project checked and timed in one call, each step
# under its own timeout, one JSON line per step, then a Markdown summary (OUT/summary.md).
#   bash pipeline/gpu_check.sh [OUT] [--device cuda|cpu] [--dry-run] [--work DIR] [--steps A,B]
# Default: OUT=out/gpu_check, --device cuda, every step, WORK (data, checkpoints, caches, runs) a
# temporary folder removed at the end (give --work to keep it). --dry-run runs the same steps with the
# CPU-scale models on a few tiny images (the test suite runs `--dry-run --device cpu`);
# --steps runs only those (e.g. to re-run a failed one; later steps reuse WORK's data and caches).
# On a bare machine it installs what is missing first (see install() below); it downloads
# nothing at run time apart from that install and generates its own data.
# Environment: PYTHON (default python3, else python), GPU_CHECK_WHEELS (a folder of wheels
# for an offline install, default REPO/.whl), GPU_CHECK_TIMEOUT_SCALE (multiplies every timeout).
# Exit status 0 when every step is ok.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=out/gpu_check DEVICE=cuda DRY=0 WORK= ONLY=
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --work) WORK=$2; shift 2 ;;
    --steps) ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT=$1; shift ;;
  esac
done
case $DEVICE in cuda|cpu) ;; *) echo "gpu_check.sh: --device $DEVICE: use cuda or cpu" >&2; exit 2 ;; esac
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if [ -z "$WORK" ]; then  # a temporary one, removed at the end (a paper-scale fp16 cache is ~2 GB)
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
fi
PY=${PYTHON:-$(command -v python3 || command -v python)}
ALL=$("$PY" "$REPO/pipeline/gpu_check.py" --list-steps) || exit 1
steps=$ALL
if [ -n "$ONLY" ]; then
  steps=${ONLY//,/ }
  for step in $steps; do
    case " $ALL " in *" $step "*) ;; *) echo "gpu_check.sh: --steps: no step '$step' (steps: $ALL)" >&2; exit 2 ;; esac
  done
fi
# a full run starts afresh; --steps adds to the earlier lines (the summary keeps each step's last)
[ -n "$ONLY" ] || rm -f "$OUT/steps.jsonl"
rm -f "$OUT/summary.md"
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.whl}
SCALE=${GPU_CHECK_TIMEOUT_SCALE:-1}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ] && [ "$DEVICE" = cpu ]; then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi

# Seconds per step. On one GPU they add up to under 8 minutes even if every step ran to its
# limit (install 60 s, correctness 195 s, timing 185 s, summary 10 s); a CPU dry run gets more.
declare -A LIMIT_GPU=([install]=60 [env]=20 [faithfulness]=40 [extract_device]=30 [sampling]=20 [codecs]=40
                      [torchrun]=45 [time_extract]=65 [time_train]=120 [summary]=10)
declare -A LIMIT_DRY=([install]=300 [env]=60 [faithfulness]=120 [extract_device]=90 [sampling]=60 [codecs]=120
                      [torchrun]=180 [time_extract]=120 [time_train]=180 [summary]=60)
limit() {
  local s
  if [ "$DRY" = 1 ]; then s=${LIMIT_DRY[$1]}; else s=${LIMIT_GPU[$1]}; fi
  awk -v s="$s" -v k="$SCALE" 'BEGIN { t = int(s * k + 0.5); printf "%d", t < 1 ? 1 : t }'  # timeout 0 = none
}

line() {  # step ok seconds [extra JSON members]: one JSON line, printed and kept in steps.jsonl
  local text="{\"step\": \"$1\", \"ok\": $2, \"seconds\": $3${4:+, $4}}"
  echo "$text"; echo "$text" >>"$OUT/steps.jsonl"
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

install() {
  # README's command, minus what a bare GPU machine cannot do: keep the machine's own CUDA build of
  # torch (pip would replace it with the pinned CPU-tested one, a download the machine cannot make),
  # and take the other dependencies from $WHEELS when that folder exists (no index needed; fill it
  # beforehand with pipeline/gpu_wheels.sh), else from the package index.
  if "$PY" -c "import torch, torchvision" 2>/dev/null; then
    local from=()
    if [ -d "$WHEELS" ]; then from=(--no-index --find-links "$WHEELS"); fi
    "$PY" -m pip install -q "${from[@]}" zarr numcodecs pcodec google-crc32c pycocotools click numpy pillow tqdm &&
      { "$PY" -m pip install -q --no-deps --no-build-isolation -e "$REPO" ||
        echo "editable install failed; running from the checkout through PYTHONPATH" >&2; }
  else
    "$PY" -m pip install -q -e "$REPO[test]"
  fi
}

t0=$(now)
if "$PY" -c "import defeat_cache.cli, zarr, pcodec, pycocotools" 2>/dev/null; then
  line install true "$(since "$t0")" '"how": "already installed"'
else
  echo "[gpu_check] installing (defeat_cache or a dependency is missing)" >&2
  if timeout "$(limit install)" bash -c "$(declare -f install); PY='$PY' WHEELS='$WHEELS' REPO='$REPO' install" >&2 &&
     "$PY" -c "import defeat_cache.cli, zarr, pcodec, pycocotools"; then
    line install true "$(since "$t0")" "\"how\": \"pip install$([ -d "$WHEELS" ] && echo " from $WHEELS")\""
  else
    line install false "$(since "$t0")" '"error": "install failed or timed out; see the log above"'
  fi
fi

status=0
args=(--device "$DEVICE" --out "$OUT" --work "$WORK")
[ "$DRY" = 1 ] && args+=(--dry-run)
for step in $steps; do
  t0=$(now)
  s=$(limit "$step")
  echo "[gpu_check] step $step (at most ${s}s)" >&2
  before=$(wc -l <"$OUT/steps.jsonl")
  rm -f "$WORK/partial_$step.json"
  timeout -k 10 "$s" "$PY" "$REPO/pipeline/gpu_check.py" --step "$step" "${args[@]}"
  rc=$?
  partial=  # what a long step measured before it was stopped
  [ -s "$WORK/partial_$step.json" ] && partial="\"partial\": $(cat "$WORK/partial_$step.json")"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    line "$step" false "$(since "$t0")" "\"error\": \"timed out after ${s}s\"${partial:+, $partial}"
  elif [ $rc -ne 0 ] && [ "$(wc -l <"$OUT/steps.jsonl")" = "$before" ]; then  # died without its line
    line "$step" false "$(since "$t0")" "\"error\": \"exit status $rc before the step reported\"${partial:+, $partial}"
  fi
  [ $rc -eq 0 ] || status=1
done

timeout "$(limit summary)" "$PY" "$REPO/pipeline/gpu_check.py" --summary --out "$OUT" || status=1
exit $status
