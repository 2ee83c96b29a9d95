#!/usr/bin/env bash
# Issue 23: the paper's Tables 2-3 on the paper's anatomy, the median nerve at the wrist (mn-wrist).
# Patient-grouped 5-fold cross-validation (manifest.csv subject), every image scored once by the fold
# model that never saw its patient, at original resolution. No reported image picks a checkpoint: under
# the paper's recipe (constant learning rate, a curve that never settles) each run keeps its best epoch on
# a patient-grouped 20% of its own training folds (--fold-val-fraction, FOLD_VAL); under the nerveseg
# recipe (poly schedule to zero) the last epoch. Resumable across sessions: each finished run's small files
# (per-image scores, ROC histograms, held-out masks, history, timing) are archived in KEEP, which is
# committed, and restored before the next call, so a finished run is never trained again.
#
# Usage: [SEEDS=1] [SHARD=0/1] [EPOCHS=N] bash studies/paper_comparison_wrist.sh PHASE
#   pilot      the training length, chosen on fold 0's training patients only: --recipe paper,
#              PILOT_EPOCHS epochs (default 60) with a patient-grouped 20% of those patients as
#              validation (the split `paper` validates fold 0 on); prints the epoch where the validation
#              Dice stops rising (studies/inner_validation.py choose-epochs) -> pass it as EPOCHS below;
#              PILOT_ARCHS (default sa_unet; the U-Net's convergence is read off each run's own inner
#              curve, summary.md "Convergence"); a finished pilot is kept in KEEP
#   paper      SA-UNet and U-Net, --recipe paper (soft Dice, Adam 5e-4, batch 4, shear), 5 folds, best
#              epoch on the inner 20% (FOLD_VAL)
#   nerveseg   SA-UNet and U-Net, --recipe nerveseg (Dice + BCE, poly, flips and intensity), 5 folds
#   others     U-Net++, Attention U-Net and MultiResUNet, --recipe paper (as `paper`), as many folds as the
#              budget allows; SA-UNet's and U-Net's finished `paper` runs are reused, not trained again
#   tables     summarize every finished run (results.csv, summary.md with Holm-corrected Wilcoxon tests
#              and the convergence table, roc.png, convergence.png, overlay_panel.png) without training
# Environment: SHARED (default ../shared/data), RUNS (default runs/paper_wrist), KEEP (default
# docs/results/paper_wrist), SEEDS (default 1), EPOCHS (default the recipe's), FOLD_VAL (default 0.2), SHARD (I/N: this process
# trains every N-th run from the I-th; several processes may share a folder), THREADS (default 2), COMPILE
# (a torch.compile mode for the training step, e.g. default: a speed setting, recorded in each run's config).
set -euo pipefail
SHARED=${SHARED:-../shared/data}
RUNS=${RUNS:-runs/paper_wrist}
KEEP=${KEEP:-docs/results/paper_wrist}
SEEDS=${SEEDS:-1}
FOLD_VAL=${FOLD_VAL:-0.2}
SHARD=${SHARD:-0/1}
THREADS=${THREADS:-2}
WRIST="$SHARED/mn-wrist"
# the data folder as the benchmark saves it (absolute); the committed archive writes it as $SHARED
SHARED_ABS=$(cd "$SHARED" 2>/dev/null && pwd -P || echo "$SHARED")
HERE="$(dirname "$0")"

restore() {  # restore PHASE: put the archived finished runs back where the benchmark looks
  [ -d "$KEEP/$1" ] || return 0
  mkdir -p "$RUNS/$1"
  cp -rn "$KEEP/$1/." "$RUNS/$1/"
  # the benchmark compares its saved data folder with the absolute one it is given
  [ -f "$RUNS/$1/benchmark.json" ] && sed -i "s#\"$SHARED/#\"$SHARED_ABS/#g" "$RUNS/$1/benchmark.json"
  return 0
}

unlocate() {  # unlocate FILE: the archive is committed, so no path of this machine (data as $SHARED, runs relative)
  sed -i -e "s#$SHARED_ABS/#$SHARED/#g" -e "s#$PWD/##g" "$1"
}

archive() {  # archive PHASE: copy the small files of every finished run (and the tables) into KEEP
  local out="$RUNS/$1" run rel
  for run in "$out"/runs/*/*; do
    [ -f "$run/eval/per_image.csv" ] || continue
    rel=${run#"$out"/}
    mkdir -p "$KEEP/$1/$rel/eval"
    cp "$run/config.json" "$run/history.csv" "$KEEP/$1/$rel/" 2>/dev/null || true
    [ -f "$KEEP/$1/$rel/config.json" ] && unlocate "$KEEP/$1/$rel/config.json"
    cp -r "$run/eval/." "$KEEP/$1/$rel/eval/"
  done
  for f in benchmark.json results.csv summary.md roc.png convergence.png overlay_panel.png efficiency.json; do
    [ -f "$out/$f" ] && cp "$out/$f" "$KEEP/$1/"
  done
  for f in benchmark.json summary.md; do [ -f "$KEEP/$1/$f" ] && unlocate "$KEEP/$1/$f"; done
  return 0
}

bench() {  # bench PHASE ARCHS RECIPE [INNER]: one benchmark call per run of this shard, archived after each
  # INNER: the --fold-val-fraction of each run (best epoch on it); none = the last epoch
  local phase=$1 archs=$2 recipe=$3 inner=${4:-} out="$RUNS/$1"
  local n_archs total i
  n_archs=$(echo "$archs" | tr ',' '\n' | wc -l)
  total=$((SEEDS * 5 * n_archs))
  restore "$phase"
  local first=${SHARD%/*} step=${SHARD#*/}
  local epochs=()
  [ -n "${EPOCHS:-}" ] && epochs=(--epochs "$EPOCHS")
  [ -n "$inner" ] && epochs+=(--fold-val-fraction "$inner")
  local speed=(--threads "$THREADS")
  [ -n "${COMPILE:-}" ] && speed+=(--compile "$COMPILE")
  local names
  IFS=',' read -r -a names <<< "$archs"
  for ((i = first; i < total; i += step)); do
    # the benchmark's job order is seed, fold, arch: job i is this run (skipped once finished)
    local run="$out/runs/${names[i % n_archs]}/seed$((i / (5 * n_archs)))_fold$(((i / n_archs) % 5))"
    [ -f "$run/eval/per_image.csv" ] && continue
    local resume=()
    [ -f "$out/benchmark.json" ] && resume=(--resume)
    nerveseg benchmark --data "$WRIST" --label 1 --archs "$archs" --recipe "$recipe" --seeds "$SEEDS" --folds 5 \
      "${speed[@]}" --shard "$i/$total" --out "$out" --quiet "${resume[@]}" "${epochs[@]}"
    archive "$phase"
  done
}

case "${1:-}" in
  pilot)
    data="$RUNS/pilot/data_f0"
    [ -f "$data/manifest.csv" ] || python "$HERE/inner_validation.py" make-folder "$WRIST" --folds 5 --fold 0 --out "$data"
    for arch in ${PILOT_ARCHS:-sa_unet}; do
      run="$RUNS/pilot/$arch" kept="$KEEP/pilot/$arch"
      [ -f "$kept/.trained" ] && continue  # finished in an earlier session: its curve is in KEEP
      resume=()
      [ -f "$run/config.json" ] && resume=(--resume)
      nerveseg train --data "$data" --label 1 --arch "$arch" --recipe paper --epochs "${PILOT_EPOCHS:-60}" \
        --val-fraction 0.2 --checkpoint last --threads "$THREADS" --quiet --out "$run" "${resume[@]}"
      mkdir -p "$kept"
      cp "$run/history.csv" "$run/config.json" "$kept/"
      sed -i "s#$PWD/##g" "$kept/config.json"  # the archive is committed: no path of this machine
      touch "$kept/.trained"
    done
    finished=()
    for kept in "$KEEP"/pilot/*/; do [ -f "$kept/.trained" ] && finished+=("${kept%/}"); done
    python "$HERE/inner_validation.py" choose-epochs "${finished[@]}" | tee "$KEEP/pilot/choice.json"
    ;;
  paper)    bench paper sa_unet,unet paper "$FOLD_VAL" ;;
  nerveseg) bench nerveseg sa_unet,unet nerveseg ;;
  others)
    # SA-UNet's and U-Net's runs under this recipe are `paper`'s (same recipe, length, folds, inner split and
    # seed): reuse every finished one (its config, curve and held-out scores and masks; no weights) rather
    # than train it again, so that the five-network table pairs the same runs the two-network one does
    restore paper
    if [ -f "$RUNS/paper/benchmark.json" ]; then
      paper_epochs=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['train']['epochs'])" "$RUNS/paper/benchmark.json")
      if [ "${EPOCHS:-$paper_epochs}" != "$paper_epochs" ]; then
        echo "others: EPOCHS=${EPOCHS:-} differs from the paper phase's $paper_epochs; its runs could not be reused" >&2
        exit 2
      fi
      for run in "$RUNS"/paper/runs/{sa_unet,unet}/*; do
        [ -f "$run/eval/per_image.csv" ] || continue
        dest="$RUNS/paper_all/runs/${run#"$RUNS"/paper/runs/}"
        [ -f "$dest/eval/per_image.csv" ] && continue
        mkdir -p "$dest"
        cp "$run/config.json" "$run/history.csv" "$dest/"
        cp -r "$run/eval" "$dest/"
      done
    fi
    bench paper_all sa_unet,unet,unet_pp,attention_unet,multires_unet paper "$FOLD_VAL"
    ;;
  tables)
    for phase in paper nerveseg paper_all; do
      restore "$phase"
      out="$RUNS/$phase"
      [ -f "$out/benchmark.json" ] || continue
      saved() { python -c "import json,sys; v = json.load(open(sys.argv[1]))$1; print(','.join(v) if isinstance(v, list) else v or '')" "$out/benchmark.json"; }
      inner=$(saved "['fold_val_fraction']")
      # the saved recipe's length and inner split: --collect-only --resume refuses any other
      nerveseg benchmark --data "$WRIST" --label 1 --out "$out" --collect-only --quiet --resume \
        --archs "$(saved "['archs']")" --recipe "$(echo "$phase" | sed 's/_all//')" --seeds "$SEEDS" --folds 5 \
        --epochs "$(saved "['train']['epochs']")" ${inner:+--fold-val-fraction "$inner"}
      archive "$phase"
    done
    ;;
  *) sed -n '2,27p' "$0"; exit 2 ;;
esac
