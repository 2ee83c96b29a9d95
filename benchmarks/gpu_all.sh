#!/usr/bin/env bash
# Every GPU measurement of issues 3 and 5 in one call of under ten minutes on one H100/H200-class
# GPU, each step under its own time limit so that one slow step cannot starve the others:
#   1. benchmarks/gpu_latency.py: eager + CUDA graphs in fp32/bf16/fp16, then torch.compile (bf16, fp32);
#   2. studies/gpu_benchmark.sh: the five-architecture comparison, 3 seeds x 5 folds, paper recipe.
# Results go to RESULTS (default runs/gpu); the benchmark's run folders are packed without weights.
#
# Usage: bash benchmarks/gpu_all.sh DATA [RESULTS]   (set NERVESEG / PYTHON where nerveseg is not installed)
case "${1:-}" in -h|--help) sed -n '2,8p' "$0"; exit 0 ;; esac  # the header above is the usage
set -uo pipefail
DATA=${1:?usage: gpu_all.sh DATA [RESULTS]}
RESULTS=${2:-runs/gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
$PYTHON -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$RESULTS/env.txt"
timeout "${LATENCY_LIMIT:-75}" $PYTHON benchmarks/gpu_latency.py --groups eager,cudagraph \
  --out "$RESULTS/gpu_latency_eager.json" > "$RESULTS/gpu_latency_eager.log" 2>&1
echo "latency (eager, CUDA graphs): exit $?"
timeout "${COMPILE_LIMIT:-80}" $PYTHON benchmarks/gpu_latency.py --groups compile --dtypes bf16,fp32 \
  --out "$RESULTS/gpu_latency_compile.json" > "$RESULTS/gpu_latency_compile.log" 2>&1
echo "latency (torch.compile): exit $?"
TIME_LIMIT=${BENCH_LIMIT:-330} bash studies/gpu_benchmark.sh "$DATA" runs/bench_gpu > "$RESULTS/gpu_benchmark.log" 2>&1
echo "benchmark: exit $?"
tar czf "$RESULTS/bench_gpu.tgz" --exclude='*.safetensors' --exclude='*.onnx' runs/bench_gpu
tail -40 "$RESULTS/gpu_benchmark.log"
