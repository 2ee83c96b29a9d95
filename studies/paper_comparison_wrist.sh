#!/usr/bin/env bash
# Issue 23: the paper's Tables 2-3 on the paper's anatomy, the median nerve at the wrist (mn-wrist).
# Patient-grouped 5-fold cross-validation (manifest.csv subject), every image scored once by the fold
# model that never saw its patient, at original resolution; the last epoch is kept (`benchmark` never
# picks a checkpoint on the reported fold). Resumable: rerun the same phase and finished runs are kept.
#
# Usage: [SEEDS=1] [SHARD=0/1] bash studies/paper_comparison_wrist.sh PHASE
#   paper      SA-UNet and U-Net, --recipe paper (soft Dice, Adam 5e-4, batch 4, shear), 5 folds
#   nerveseg   SA-UNet and U-Net, --recipe nerveseg (Dice + BCE, poly, flips and intensity), 5 folds
#   others     U-Net++, Attention U-Net and MultiResUNet, --recipe paper, as many folds as the budget allows
#   tables     summarize every finished run (results.csv, summary.md with Holm-corrected Wilcoxon tests,
#              roc.png, overlay_panel.png) without training
# Environment: SHARED (default ../shared/data), RUNS (default runs/paper_wrist), SEEDS (default 1),
# SHARD (I/N: this process trains every N-th run from the I-th; several processes may share a folder).
set -euo pipefail
SHARED=${SHARED:-../shared/data}
RUNS=${RUNS:-runs/paper_wrist}
SEEDS=${SEEDS:-1}
SHARD=${SHARD:-0/1}
WRIST="$SHARED/mn-wrist"

bench() {  # bench OUT ARCHS RECIPE [extra flags]
  local out=$1 archs=$2 recipe=$3; shift 3
  local resume=()
  [ -f "$out/benchmark.json" ] && resume=(--resume)
  nerveseg benchmark --data "$WRIST" --label 1 --archs "$archs" --recipe "$recipe" --seeds "$SEEDS" --folds 5 \
    --shard "$SHARD" --out "$out" --quiet "${resume[@]}" "$@"
}

case "${1:-}" in
  paper)    bench "$RUNS/paper" sa_unet,unet paper ;;
  nerveseg) bench "$RUNS/nerveseg" sa_unet,unet nerveseg ;;
  others)   bench "$RUNS/paper_all" sa_unet,unet,unet_pp,attention_unet,multires_unet paper ;;
  tables)
    for out in "$RUNS/paper" "$RUNS/nerveseg" "$RUNS/paper_all"; do
      [ -f "$out/benchmark.json" ] && nerveseg benchmark --data "$WRIST" --label 1 --out "$out" --collect-only --quiet \
        --archs "$(python -c "import json,sys; print(','.join(json.load(open(sys.argv[1]))['archs']))" "$out/benchmark.json")" \
        --recipe "$(basename "$out" | sed 's/_all//')" --seeds "$SEEDS" --folds 5
    done
    ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
