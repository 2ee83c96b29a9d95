#!/usr/bin/env bash
# Issue 23 on one lent GPU in one call: the paper's comparison on mn-wrist, the whole table (SEEDS x 5
# patient-grouped folds). Two benchmarks share the GPU at once, each through studies/gpu_benchmark.sh:
#   paper     the five architectures, --recipe paper, EPOCHS_PAPER (41, chosen by the CPU pilot on fold 0's
#             training patients) with each run's best epoch on a patient-grouped 20% of its training folds
#   nerveseg  SA-UNet and U-Net, --recipe nerveseg (60 epochs, the last kept)
# WORKERS_PAPER + WORKERS_NERVESEG processes in all (default 12 + 4: the paper phase has 2.5x the runs).
# Both stop training at TIME_LIMIT seconds (default 420, so that the summaries fit a 9-minute call) and
# summarize what finished; finished runs are never redone, so a second call goes on where this one stopped.
# These are separate folders from the CPU study's (runs/paper_wrist): 3 seeds against its one, so the
# two are never mixed in one table.
#
# Usage: bash studies/gpu_paper_wrist.sh [OUT]     (default runs/paper_wrist_gpu)
# Environment: SHARED (default ../shared/data), SEEDS (3), TIME_LIMIT (420), WORKERS_PAPER (12),
# WORKERS_NERVESEG (4), EPOCHS_PAPER (41), NERVESEG (the command, default nerveseg).
case "${1:-}" in -h|--help) sed -n '2,15p' "$0"; exit 0 ;; esac
set -uo pipefail
OUT=${1:-runs/paper_wrist_gpu}
SHARED=${SHARED:-../shared/data}
HERE="$(dirname "$0")"
export SEEDS=${SEEDS:-3} TIME_LIMIT=${TIME_LIMIT:-420} FOLDS=5 SIZE=256
mkdir -p "$OUT"
ARCHS=sa_unet,unet,unet_pp,attention_unet,multires_unet RECIPE=paper FOLD_VAL=0.2 EPOCHS=${EPOCHS_PAPER:-41} \
  WORKERS=${WORKERS_PAPER:-12} bash "$HERE/gpu_benchmark.sh" "$SHARED/mn-wrist" "$OUT/paper" > "$OUT/paper.log" 2>&1 &
paper=$!
ARCHS=sa_unet,unet RECIPE=nerveseg EPOCHS=60 WORKERS=${WORKERS_NERVESEG:-4} \
  bash "$HERE/gpu_benchmark.sh" "$SHARED/mn-wrist" "$OUT/nerveseg" > "$OUT/nerveseg.log" 2>&1 &
nerveseg=$!
status=0
wait "$paper" || { echo "paper phase failed: see $OUT/paper.log" >&2; status=1; }
wait "$nerveseg" || { echo "nerveseg phase failed: see $OUT/nerveseg.log" >&2; status=1; }
for phase in paper nerveseg; do
  echo "== $phase"
  cat "$OUT/$phase/summary.md" 2>/dev/null || tail -5 "$OUT/$phase.log"
done
exit $status
