#!/usr/bin/env bash
# Real-data runs behind docs/benchmarks.md (issue 2): SA-UNet and U-Net on usgra-seg, nerve label 1,
# 5-fold split by image (seed 0), a validation fold (0; 1 for E5) held out from training and evaluated at the
# original resolution. Resumable: rerunning continues unfinished runs and skips finished ones.
# Usage: bash studies/real_data_core.sh [DATA] [OUT]
case "${1:-}" in -h|--help) sed -n '2,5p' "$0"; exit 0 ;; esac  # the header above is the usage
set -euo pipefail
DATA=${1:-../shared/data/usgra-seg}
OUT=${2:-runs/core}
mkdir -p "$OUT"

run() {  # name, fold, then train arguments
  local name=$1; local fold=$2; shift 2
  local dir="$OUT/$name"
  local resume=()
  [ -f "$dir/config.json" ] && resume=(--resume)
  if [ ! -f "$dir/eval/metrics.json" ]; then
    local t0=$(date +%s)
    nerveseg train --data "$DATA" --label 1 --folds 5 --fold "$fold" --seed 0 --quiet --out "$dir" "${resume[@]}" "$@"
    echo "$name train_seconds $(( $(date +%s) - t0 ))" | tee -a "$OUT/timings.txt"
    nerveseg evaluate --model "$dir" --data "$DATA" --subset val --out "$dir/eval" --quiet
  fi
}

# E1: the paper's recipe as given (constant Adam 5e-4, batch 4, shear only), 256x256, 30 epochs
run sa_unet_paper_256_e30 0 --arch sa_unet --size 256 --epochs 30
# E2: longer, cosine-annealed, flips + intensity augmentation
run sa_unet_cos_256_e60_aug 0 --arch sa_unet --size 256 --epochs 60 --schedule cosine --augment shear,hflip,gamma,contrast
# E3: the U-Net baseline under the paper's recipe (same as E1)
run unet_paper_256_e30 0 --arch unet --size 256 --epochs 30
# E4: smaller input under the paper's recipe (what input size costs)
run sa_unet_paper_128_e30 0 --arch sa_unet --size 128 --epochs 30
# E5: E2's recipe (the shipped model's) on a second held-out fold, for the model card
run sa_unet_cos_256_e60_aug_fold1 1 --arch sa_unet --size 256 --epochs 60 --schedule cosine --augment shear,hflip,gamma,contrast
