#!/usr/bin/env bash
# Issue 22: one default model for the median nerve at the wrist (mn-wrist) and the nerves of regional
# anaesthesia (usgra-seg). Every run is resumable: rerun the same phase and finished runs are skipped,
# an interrupted one continues (--resume). Figures: docs/benchmarks.md, "The median nerve at the wrist".
#
# Usage: [FOLDS="0 1"] [ARMS="effunet_both"] bash studies/wrist_study.sh PHASE
#   screen   train each arm on each fold in FOLDS (patient-grouped 5-fold split made within each data
#            folder, seed 0) and score its held-out images per folder (RUNS/screen/ARM_fK/eval)
#   pair     for each fold in FOLDS, the 2-member ensemble of effunet_both_fK and effunet_both_t1_fK
#            (RUNS/screen/effunet_pair_fK, `nerveseg ensemble`), scored on the images neither member
#            trained on (`--subset unseen`: fold K's held-out images) in RUNS/screen/effunet_pair_fK/eval
#   final    train the shipped recipe on every image of both folders (no hold-out, last epoch kept)
#   final_routed  one model per anatomy instead: effunet_wrist and effunet_usgra each on every image of its
#            folder, the anatomy router fitted on both folders (studies/anatomy_router.py, its patient-grouped
#            accuracy in RUNS/final/router/router.json), and the two assembled as one routed model
#            (`nerveseg ensemble --route-by`: each image goes to the model its router names) in RUNS/final/routed;
#            ship it with SHIP_RUN=RUNS/final/routed MEMBER_THRESHOLDS="wrist=0.75" (each member's cut, chosen by
#            nested CV: studies/postprocess_cv.py on its fold runs)
#   ship     copy the final run (or SHIP_RUN) into src/nerveseg/pretrained/ with its ONNX graph and model card
# Arms (all --recipe nerveseg: Dice + BCE, poly schedule, shear/hflip/gamma/contrast, last epoch):
#   effunet_both   efficientnet_unet (ImageNet EfficientNet-Lite0 encoder), both folders, 30 epochs
#   sa_both        sa_unet, both folders, 60 epochs (the recipe's own length)
#   sa_wrist       sa_unet, mn-wrist only, 60 epochs
#   effunet_wrist  efficientnet_unet, mn-wrist only, 30 epochs
#   effunet_usgra  efficientnet_unet, usgra-seg only, 30 epochs (with effunet_wrist: one model per anatomy,
#                  against the shared model; each scored on its own folder's held-out fold)
#   effunet_both_t1  effunet_both with another training seed (--train-seed 1) on the same split: the second
#                  member of a seed pair (phase `pair`), after 320 px fell short on folds 0-1
#   effunet_lite1_both, effunet_lite2_both  effunet_both on the deeper (Lite1) or deeper and wider (Lite2)
#                  ImageNet encoder, same decoder and recipe
#   effunet_both_384, effunet_both_320, effunet_both_45   the wrist levers after the 5-fold figures fell
#                  short of 0.90: a larger input (wrist nerves are a few hundred pixels at 256; 384 px took about
#                  1.8x the 256-px model's time per 606x468 frame, over the 100-ms budget, so 320 px is the one
#                  that can ship), 45 epochs. Screened on folds 0-1 and compared per image with `python studies/pool_fold_evals.py ARM_f0/eval ARM_f1/eval --against
#                  docs/results/wrist_cv_effunet/per_image.csv` (per folder, paired Wilcoxon)
# EVAL_TTA=1 also scores each fold with flip test-time augmentation (RUNS/screen/ARM_fK/eval_tta).
# Environment: SHARED (default ../shared/data), RUNS (default runs/wrist), THREADS (default 2), PYTHON (default python).
set -euo pipefail
SHARED=${SHARED:-../shared/data}
RUNS=${RUNS:-runs/wrist}
THREADS=${THREADS:-2}
WRIST="$SHARED/mn-wrist"
USGRA="$SHARED/usgra-seg"
FOLDS=${FOLDS:-0 1}
ARMS=${ARMS:-effunet_both}

arm_args() {  # the training flags of an arm
  case "$1" in
    effunet_both)  echo "--data $WRIST --data $USGRA --arch efficientnet_unet --epochs 30" ;;
    effunet_wrist) echo "--data $WRIST --arch efficientnet_unet --epochs 30" ;;
    effunet_usgra) echo "--data $USGRA --arch efficientnet_unet --epochs 30" ;;
    effunet_both_t1) echo "--data $WRIST --data $USGRA --arch efficientnet_unet --epochs 30 --train-seed 1" ;;
    effunet_lite1_both) echo "--data $WRIST --data $USGRA --arch efficientnet_unet --epochs 30 --model-kwargs {\"encoder\":\"lite1\"}" ;;
    effunet_lite2_both) echo "--data $WRIST --data $USGRA --arch efficientnet_unet --epochs 30 --model-kwargs {\"encoder\":\"lite2\"}" ;;
    effunet_both_384) echo "--data $WRIST --data $USGRA --arch efficientnet_unet --epochs 30 --size 384" ;;
    effunet_both_320) echo "--data $WRIST --data $USGRA --arch efficientnet_unet --epochs 30 --size 320" ;;
    effunet_both_45)  echo "--data $WRIST --data $USGRA --arch efficientnet_unet --epochs 45" ;;
    sa_both)       echo "--data $WRIST --data $USGRA --arch sa_unet --epochs 60" ;;
    sa_wrist)      echo "--data $WRIST --arch sa_unet --epochs 60" ;;
    *) echo "unknown arm $1" >&2; return 2 ;;
  esac
}

arm_data() {  # the data folders an arm trains on, and so is scored on (its held-out fold of each)
  case "$1" in
    *_wrist) echo "--data $WRIST" ;;
    *_usgra) echo "--data $USGRA" ;;
    *) echo "--data $WRIST --data $USGRA" ;;
  esac
}

train_run() {  # train_run OUT FLAGS...: train, resume an interrupted run, or skip a finished one
  local out=$1; shift
  [ -f "$out/.trained" ] && { echo "finished: $out"; return 0; }
  local resume=()
  [ -f "$out/config.json" ] && resume=(--resume)
  nerveseg train --recipe nerveseg --label 1 --threads "$THREADS" --quiet --out "$out" "${resume[@]}" "$@"
  touch "$out/.trained"
}

case "${1:-}" in
  screen)
    for arm in $ARMS; do
      for k in $FOLDS; do
        run="$RUNS/screen/${arm}_f$k"
        # shellcheck disable=SC2046
        train_run "$run" $(arm_args "$arm") --folds 5 --fold "$k"
        # shellcheck disable=SC2046
        [ -f "$run/eval/metrics.json" ] || nerveseg evaluate --model "$run" $(arm_data "$arm") \
          --subset val --out "$run/eval" --quiet --no-overlays
        if [ "${EVAL_TTA:-0}" = 1 ] && [ ! -f "$run/eval_tta/metrics.json" ]; then
          # shellcheck disable=SC2046
          nerveseg evaluate --model "$run" $(arm_data "$arm") --subset val --tta --out "$run/eval_tta" \
            --quiet --no-overlays
        fi
      done
    done
    ;;
  pair)
    for k in $FOLDS; do
      pair="$RUNS/screen/effunet_pair_f$k"
      [ -f "$pair/config.json" ] || nerveseg ensemble --out "$pair" --names s0,s1 \
        "$RUNS/screen/effunet_both_f$k" "$RUNS/screen/effunet_both_t1_f$k"
      [ -f "$pair/eval/metrics.json" ] || nerveseg evaluate --model "$pair" --data "$WRIST" --data "$USGRA" \
        --subset unseen --out "$pair/eval" --quiet --no-overlays
    done
    ;;
  final)
    train_run "$RUNS/final/effunet_both" --data "$WRIST" --data "$USGRA" --arch efficientnet_unet --epochs 30 --val-fraction 0
    ;;
  final_routed)
    train_run "$RUNS/final/effunet_wrist" --data "$WRIST" --arch efficientnet_unet --epochs 30 --val-fraction 0
    train_run "$RUNS/final/effunet_usgra" --data "$USGRA" --arch efficientnet_unet --epochs 30 --val-fraction 0
    [ -f "$RUNS/final/router/router.json" ] || "${PYTHON:-python}" "$(dirname "$0")/anatomy_router.py" --route wrist "$WRIST" \
      --route nerves "$USGRA" --out "$RUNS/final/router"
    [ -f "$RUNS/final/routed/config.json" ] || nerveseg ensemble "$RUNS/final/effunet_wrist" "$RUNS/final/effunet_usgra" \
      --names wrist,nerves --route-by "$RUNS/final/router" --out "$RUNS/final/routed"
    ;;
  ship)
    # SHIP_RUN: the run to ship (default the final all-data run; stop 21 shipped the fold-0 run,
    # SHIP_RUN=runs/wrist/screen/effunet_both_f0, with its held-out figures as CARD_VALIDATION)
    "${PYTHON:-python}" "$(dirname "$0")/ship_default_model.py" "${SHIP_RUN:-$RUNS/final/effunet_both}" --name nerveseg_nerves --no-tta --keep-largest '' \
      --threshold 0.5 --low-confidence "${LOW_CONFIDENCE:-0.7}" ${CV_METRICS:+--cv-metrics "$CV_METRICS"} \
      ${CARD_VALIDATION:+--card-validation "$CARD_VALIDATION"} \
      $(for m in ${MEMBER_THRESHOLDS:-}; do printf -- '--member-threshold %s ' "$m"; done)
    ;;
  *)
    sed -n '2,37p' "$0"; exit 2 ;;
esac
