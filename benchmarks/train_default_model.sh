#!/usr/bin/env bash
# Reproduce the SA-UNet shipped inside the package (src/nerveseg/pretrained/sa_unet_usgra):
# all 204 usgra-seg images, nerve label 1, no validation hold-out (the last epoch is kept), with the
# recipe chosen on cross-validation in docs/benchmarks.md ("Accuracy study": `--recipe nerveseg`).
# Seeded and deterministic on CPU; about 26 min of epochs on 2 cores.
# Usage: bash benchmarks/train_default_model.sh [DATA] [RUN] [CV_METRICS]
set -euo pipefail
DATA=${1:-../shared/data/usgra-seg}
RUN=${2:-runs/default_model}
CV=${3:-runs/study/sa_unet_e2_dice_ce_poly/cv_plain/metrics.json}
resume=()
[ -f "$RUN/config.json" ] && resume=(--resume)
nerveseg train --data "$DATA" --recipe nerveseg --val-fraction 0 --seed 0 --quiet --out "$RUN" "${resume[@]}"
# copy it into the package without machine paths, export its ONNX graph (so the default backend never
# exports at run time) and write its model card from the cross-validated figures when they exist
cv=(); [ -f "$CV" ] && cv=(--cv-metrics "$CV")
python benchmarks/ship_default_model.py "$RUN" --name sa_unet_usgra --no-tta --keep-largest '' --cv-folds "${CV_FOLDS:-5}" "${cv[@]}"
