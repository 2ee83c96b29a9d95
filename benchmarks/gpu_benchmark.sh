#!/usr/bin/env bash
# The paper's comparison (issue 3) on one GPU in one call: every architecture trains in its own
# process at the same time (one small U-Net does not fill an H100), then one last call writes the
# summary over all of them. Finished runs are never redone, so an interrupted call can be repeated.
#
# Usage: bash benchmarks/gpu_benchmark.sh [DATA] [OUT]
# Protocol (override with env vars): SEEDS=3 FOLDS=5 EPOCHS=30 SIZE=256, the paper's recipe.
set -euo pipefail
DATA=${1:-../shared/data/usgra-seg}
OUT=${2:-runs/bench_gpu}
SEEDS=${SEEDS:-3}; FOLDS=${FOLDS:-5}; EPOCHS=${EPOCHS:-30}; SIZE=${SIZE:-256}
ARCHS=${ARCHS:-sa_unet,unet,unet_pp,attention_unet,multires_unet}
common=(--data "$DATA" --label 1 --seeds "$SEEDS" --folds "$FOLDS" --epochs "$EPOCHS" --size "$SIZE" --out "$OUT" --quiet)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt" || echo "no GPU: running on CPU"
start=$(date +%s)
pids=()
for arch in ${ARCHS//,/ }; do
  nerveseg benchmark "${common[@]}" --archs "$arch" --resume --no-latency > "$OUT/$arch.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" -eq 0 ] || { echo "a worker failed: see $OUT/*.log"; exit 1; }
# all runs finished: this call only collects them, measures CPU latency and writes the summary
nerveseg benchmark "${common[@]}" --archs "$ARCHS" --resume > "$OUT/summary.log" 2>&1
echo "wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.md"
cat "$OUT/summary.md"
