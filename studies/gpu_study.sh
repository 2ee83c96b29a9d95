#!/usr/bin/env bash
# Issue 10's accuracy levers that do not fit the 2-core CPU (longer training, larger inputs,
# U-Net under the same recipe), on one GPU in one call of at most 9 minutes. Every arm is trained
# on the five folds; WORKERS processes share the GPU and take the arm x fold jobs from one queue
# (an flock'd counter), so one slow arm does not hold back the others. Then every finished fold is
# scored on its own held-out fold at original resolution, and each arm's folds are pooled against
# the shipped recipe's (Wilcoxon on per-image Dice, studies/pool_fold_evals.py).
# Finished jobs are never redone and unfinished ones resume, so a cut-off call can be repeated.
#
# Usage: bash studies/gpu_study.sh DATA [OUT]
# On the device machine (no ../shared there, nerveseg not installed): copy the data into a folder
# .git/info/exclude ignores and carry it, e.g.
#   here:  mkdir -p .data && cp -r ../shared/data/usgra-seg .data/   (31 MB; .data/ in .git/info/exclude)
#   there: PYTHONPATH=src NERVESEG="python3 -m nerveseg" bash studies/gpu_study.sh .data/usgra-seg $OUT/study
# Capacity: in issue 3's GPU call, eager SA-UNet took 9.2 s per 256-px epoch under 15-way sharing
# (launch-bound), so 7 minutes hold about 15 x 45 = 680 fold-epochs: the default arms (e120, s384 and
# the baseline: about 1,600 fold-epochs at 256-px cost) need COMPILE=reduce-overhead (CUDA graphs; not yet
# measured on a GPU) or a second call, which resumes. ARMS picks fewer.
# Env: ARMS (names below, comma-separated; default e120,s384,nerveseg), FOLDS="0 1 2 3 4", WORKERS=15,
# COMPILE (a torch.compile mode for training, e.g. reduce-overhead),
# TIME_LIMIT=420 s for training (what has finished by then is scored), EPOCH_SCALE=1 (e.g. 0.02 for a
# CPU dry run of the script itself), SIZE_OVERRIDE (likewise), NERVESEG=nerveseg.
case "${1:-}" in -h|--help) sed -n '2,22p' "$0"; exit 0 ;; esac  # the header above is the usage
set -uo pipefail
DATA=${1:?usage: gpu_study.sh DATA [OUT]}
OUT=${2:-runs/gpu_study}
FOLDS=${FOLDS:-0 1 2 3 4}
WORKERS=${WORKERS:-15}
TIME_LIMIT=${TIME_LIMIT:-420}
EPOCH_SCALE=${EPOCH_SCALE:-1}
NERVESEG=${NERVESEG:-nerveseg}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/.locks"

# arm name -> train flags on top of `--recipe nerveseg` (256 px, 60 epochs, Dice + CE, poly,
# shear + hflip + gamma + contrast, last epoch)
declare -A ARM=(
  [nerveseg]=""
  [e120]="--epochs 120"
  [long_aug]="--epochs 100 --augment shear,scale,rotate,elastic,hflip,gamma,contrast,brightness,noise"
  [s384]="--size 384"
  [s384_e120]="--size 384 --epochs 120"
  [unet]="--arch unet"
)
ORDER=(e120 s384 nerveseg)  # slowest first, so the queue ends evenly
if [ -n "${ARMS:-}" ]; then IFS=, read -r -a ORDER <<< "$ARMS"; fi
for arm in "${ORDER[@]}"; do [ -n "${ARM[$arm]+set}" ] || { echo "unknown arm $arm" >&2; exit 2; }; done

jobs_file="$OUT/jobs.txt"
: > "$jobs_file"
for arm in "${ORDER[@]}"; do for fold in $FOLDS; do echo "$arm $fold" >> "$jobs_file"; done; done
echo 0 > "$OUT/.next"

(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU (nvidia-smi absent)") \
  | tee "$OUT/gpu.txt"

train_job() {  # arm fold
  local arm=$1 fold=$2 dir="$OUT/$1/fold_$2"
  [ -f "$dir/.trained" ] && return 0
  # shellcheck disable=SC2206
  local flags=(${ARM[$arm]})
  local epochs=60 i
  for ((i = 0; i < ${#flags[@]}; i++)); do [ "${flags[$i]}" = --epochs ] && epochs=${flags[$((i + 1))]}; done
  epochs=$(python3 -c "print(max(1, round($epochs * $EPOCH_SCALE)))")
  local resume=() left=$((DEADLINE - $(date +%s)))
  [ "$left" -gt 0 ] || return 0
  [ -f "$dir/config.json" ] && resume=(--resume)
  # the time limit is on the training process itself, so none outlives the call's training phase
  timeout "$left" $NERVESEG train --data "$DATA" --recipe nerveseg --seed 0 --folds 5 --fold "$fold" --quiet --threads 1 \
    "${flags[@]}" --epochs "$epochs" ${SIZE_OVERRIDE:+--size $SIZE_OVERRIDE} ${COMPILE:+--compile $COMPILE} \
    --out "$dir" "${resume[@]}" \
    >> "$OUT/$arm.fold_$fold.log" 2>&1 && touch "$dir/.trained"
}

worker() {
  local n line
  while true; do
    n=$(flock "$OUT/.locks/queue" bash -c 'n=$(cat "$0"); echo $((n + 1)) > "$0"; echo $n' "$OUT/.next")
    line=$(sed -n "$((n + 1))p" "$jobs_file")
    [ -n "$line" ] || return 0
    # shellcheck disable=SC2086
    train_job $line
  done
}

start=$(date +%s)
DEADLINE=$((start + TIME_LIMIT))
pids=()
for ((w = 0; w < WORKERS; w++)); do
  OMP_NUM_THREADS=1 bash -c "$(declare -p ARM OUT DATA EPOCH_SCALE NERVESEG DEADLINE jobs_file 2>/dev/null;
    declare -p SIZE_OVERRIDE COMPILE 2>/dev/null; declare -f train_job worker); worker" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
echo "training: $(( $(date +%s) - start )) s; finished: $(find "$OUT" -name .trained | wc -l) of $(wc -l < "$jobs_file") jobs"

# score every finished fold on its own held-out fold (original resolution, threshold 0.5,
# no TTA, no keep-largest: the shipped model's inference), several at a time
for arm in "${ORDER[@]}"; do for fold in $FOLDS; do
  dir="$OUT/$arm/fold_$fold"
  [ -f "$dir/.trained" ] && [ ! -f "$dir/eval/metrics.json" ] && echo "$dir"
done; done | xargs -r -P "$WORKERS" -I{} sh -c \
  "OMP_NUM_THREADS=1 $NERVESEG evaluate --model {} --data '$DATA' --subset val --backend torch --no-tta \
   --keep-largest '' --no-overlays --quiet --out {}/eval > {}/eval.log 2>&1 || echo 'evaluate failed: {} (see {}/eval.log)'"

summary="$OUT/summary.txt"
: > "$summary"
base=()
for fold in $FOLDS; do
  [ -f "$OUT/nerveseg/fold_$fold/eval/per_image.csv" ] && base+=("$OUT/nerveseg/fold_$fold/eval/per_image.csv")
done
if [ ${#base[@]} -gt 0 ]; then
  # one table of the baseline's held-out images, for every arm's paired test
  python3 - "$OUT/nerveseg_pooled.csv" "${base[@]}" <<'EOF'
import csv, sys
rows = [r for path in sys.argv[2:] for r in csv.DictReader(open(path, newline=""))]
with open(sys.argv[1], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
EOF
fi
for arm in "${ORDER[@]}"; do
  evals=()
  for fold in $FOLDS; do
    [ -f "$OUT/$arm/fold_$fold/eval/per_image.csv" ] && evals+=("$OUT/$arm/fold_$fold/eval")
  done
  [ ${#evals[@]} -gt 0 ] || { echo "== $arm: no finished fold" >> "$summary"; continue; }
  against=()
  [ "$arm" != nerveseg ] && [ ${#base[@]} -gt 0 ] && against=(--against "$OUT/nerveseg_pooled.csv")
  { echo "== $arm (${ARM[$arm]:-the shipped recipe})"; python3 studies/pool_fold_evals.py "${evals[@]}" "${against[@]}"; } \
    >> "$summary" 2>&1
done
echo "- wall time: $(( $(date +%s) - start )) s on $(head -1 "$OUT/gpu.txt"), $WORKERS workers" >> "$summary"
cat "$summary"
# the evaluations and histories, without weights, for the docs
tar czf "$OUT/../gpu_study_results.tgz" --exclude='*.safetensors' --exclude='*.onnx' -C "$(dirname "$OUT")" "$(basename "$OUT")"
