#!/usr/bin/env bash
# Issue 13's GPU measurements in one call of under nine minutes on one H100/H200-class GPU, each step
# under its own time limit:
#   1. benchmarks/gpu_train_speed.py: SA-UNet vs U-Net epoch time, eager vs torch.compile (default and
#      reduce-overhead = CUDA graphs), through the real training loop;
#   2. benchmarks/gpu_latency.py: batch-1 latency, eager vs CUDA graphs vs torch.compile, same two networks;
# Usage: bash benchmarks/gpu_scale.sh [RESULTS]   (default runs/gpu_scale; PYTHON overrides python3)
# Checked without a GPU by: python benchmarks/gpu_train_speed.py --cpu-check; python benchmarks/gpu_latency.py --cpu-check
case "${1:-}" in -h|--help) sed -n '2,8p' "$0"; exit 0 ;; esac  # the header above is the usage
set -uo pipefail
RESULTS=${1:-runs/gpu_scale}
PYTHON=${PYTHON:-python3}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
$PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$RESULTS/env.txt"
timeout "${TRAIN_LIMIT:-300}" $PYTHON benchmarks/gpu_train_speed.py --out "$RESULTS/train_speed.json" \
  > "$RESULTS/train_speed.log" 2>&1
echo "training speed: exit $?"; tail -3 "$RESULTS/train_speed.log"
timeout "${LATENCY_LIMIT:-150}" $PYTHON benchmarks/gpu_latency.py --archs sa_unet,unet --groups eager,cudagraph,compile \
  --dtypes bf16 --out "$RESULTS/latency.json" > "$RESULTS/latency.log" 2>&1
echo "latency: exit $?"; tail -12 "$RESULTS/latency.log"
# a multi-GPU run (NCCL) needs >= 2 GPUs: torchrun --standalone --nproc_per_node=2 -m nerveseg train ... (docs/SCALE.md)
