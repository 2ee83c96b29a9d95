#!/usr/bin/env bash
# The paper's comparison (issue 3) on one GPU in one call. WORKERS processes share the GPU and one
# output folder, each training a disjoint shard of the arch x seed x fold runs (one small U-Net does
# not fill an H100), each on one CPU thread; then one call summarizes every finished run.
# Finished runs are never redone, so an interrupted call can be repeated.
#
# Usage: bash studies/gpu_benchmark.sh [DATA] [OUT]
# Protocol (env vars): SEEDS=3 FOLDS=5 EPOCHS=30 SIZE=256 (the paper's recipe), RECIPE=paper (any of
# `nerveseg recipes`), FOLD_VAL (unset: the last epoch; e.g. 0.2: each run's best epoch on a subject-grouped
# 20% of its training folds), WORKERS=16 (not a multiple of the 5 architectures, so each worker gets a mix of fast and slow ones),
# TIME_LIMIT=480 seconds for the training phase (what has finished by then is summarized; rerun to
# finish the rest), NERVESEG="nerveseg" (e.g. "python3 -m nerveseg" where it is not installed).
case "${1:-}" in -h|--help) sed -n '2,12p' "$0"; exit 0 ;; esac  # the header above is the usage
set -uo pipefail
DATA=${1:-../shared/data/usgra-seg}
OUT=${2:-runs/bench_gpu}
SEEDS=${SEEDS:-3}; FOLDS=${FOLDS:-5}; EPOCHS=${EPOCHS:-30}; SIZE=${SIZE:-256}
WORKERS=${WORKERS:-16}; TIME_LIMIT=${TIME_LIMIT:-480}; NERVESEG=${NERVESEG:-nerveseg}
ARCHS=${ARCHS:-sa_unet,unet,unet_pp,attention_unet,multires_unet}
RECIPE=${RECIPE:-paper}; FOLD_VAL=${FOLD_VAL:-}
common=(--data "$DATA" --label 1 --archs "$ARCHS" --recipe "$RECIPE" --seeds "$SEEDS" --folds "$FOLDS" --epochs "$EPOCHS"
        --size "$SIZE" --out "$OUT" --quiet --resume --no-latency)
[ -n "$FOLD_VAL" ] && common+=(--fold-val-fraction "$FOLD_VAL")
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || echo "CPU (no nvidia-smi)" > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
start=$(date +%s)
# the benchmark.json every worker checks must exist before they start together
$NERVESEG benchmark "${common[@]}" --collect-only > "$OUT/init.log" 2>&1
pids=()
for ((i = 0; i < WORKERS; i++)); do
  OMP_NUM_THREADS=1 timeout "$TIME_LIMIT" $NERVESEG benchmark "${common[@]}" --threads 1 --shard "$i/$WORKERS" \
    > "$OUT/worker$i.log" 2>&1 &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
[ "$failed" -eq 0 ] || echo "$failed worker(s) stopped early (time limit or error): see $OUT/worker*.log"
$NERVESEG benchmark "${common[@]}" --collect-only > "$OUT/summary.log" 2>&1 || { cat "$OUT/summary.log"; exit 1; }
echo "- wall time of this script: $(( $(date +%s) - start )) s on $(head -1 "$OUT/gpu.txt"), $WORKERS workers" \
  | tee -a "$OUT/summary.md"
cat "$OUT/summary.md"
