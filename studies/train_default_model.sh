#!/usr/bin/env bash
# Reproduce the SA-UNet pair shipped until stop 21 (src/nerveseg/pretrained/sa_unet_usgra, in git history): SA-UNets
# trained with the recipe chosen on cross-validation in docs/benchmarks.md (`--recipe nerveseg`) on all
# 204 usgra-seg images, nerve label 1, no validation hold-out (the last epoch is kept), one per
# training seed in SEEDS (default "0 1"), averaged as one ensemble folder when there are several.
# Seeded and deterministic on CPU; about 25 min of epochs per model on 2 cores.
# Usage: [SEEDS="0 1"] [THRESHOLD=0.5] [LOW_CONFIDENCE=0.7] bash studies/train_default_model.sh [DATA] [RUN] [CV_METRICS]
# CV_METRICS: the recipe's cross-validated metrics.json (for a 2-seed ensemble: the per-fold pairs of
# `accuracy_study.sh seeds`, pooled by `pool_fold_evals.py --out`); it becomes the model card's figures.
case "${1:-}" in -h|--help) sed -n '2,9p' "$0"; exit 0 ;; esac  # the header above is the usage
set -euo pipefail
DATA=${1:-../shared/data/usgra-seg}
RUN=${2:-runs/default_model}
CV=${3:-runs/study/pair_e2_seed1/cv_pooled/metrics.json}
SEEDS=${SEEDS:-0 1}
members=()
for seed in $SEEDS; do
  member="$RUN/seed_$seed"
  resume=()
  [ -f "$member/config.json" ] && resume=(--resume)
  nerveseg train --data "$DATA" --recipe nerveseg --val-fraction 0 --seed 0 --train-seed "$seed" --quiet \
    --out "$member" "${resume[@]}"
  members+=("$member")
done
shipped="${members[0]}"
if [ ${#members[@]} -gt 1 ]; then
  shipped="$RUN/ensemble"
  [ -f "$shipped/config.json" ] || nerveseg ensemble "${members[@]}" --out "$shipped"
fi
# copy it into the package without machine paths, export each member's ONNX graph (so the default
# backend never exports at run time) and write its model card from the cross-validated figures
cv=(); [ -f "$CV" ] && cv=(--cv-metrics "$CV")
# THRESHOLD: the probability cut chosen on cross-validation (studies/postprocess_cv.py; docs/MODEL_CARD.md);
# LOW_CONFIDENCE: the QC flag's cut, chosen the same way (studies/qc_flags_cv.py)
python studies/ship_default_model.py "$shipped" --name sa_unet_usgra --no-tta --keep-largest '' \
  --threshold "${THRESHOLD:-0.5}" --low-confidence "${LOW_CONFIDENCE:-0.7}" --cv-folds "${CV_FOLDS:-5}" "${cv[@]}"
