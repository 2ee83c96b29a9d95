"""CPU inference latency at 512x512, batch 1: median of repeated forward passes.

Usage: python benchmarks/cpu_inference.py [--threads 2] [--repeats 20] [--archs sa_unet,unet]
Prints a Markdown table; speeds are compared as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from nerveseg.models import count_gflops, count_parameters, create


def median_ms(model, x, repeats: int, warmup: int = 3) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--archs", default="sa_unet,unet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"batch 1, {args.size}x{args.size}, median of {args.repeats}")
    print("| arch | params | GFLOPs | fp32 default layout (ms) | fp32 channels_last (ms) | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.archs.split(","):
        torch.manual_seed(0)
        model = create(name).eval()
        x = torch.randn(1, 1, args.size, args.size)
        default = median_ms(model, x, args.repeats)
        model = model.to(memory_format=torch.channels_last)
        last = median_ms(model, x.contiguous(memory_format=torch.channels_last), args.repeats)
        print(f"| {name} | {count_parameters(model):,} | {count_gflops(model, args.size, args.size):.1f} | "
              f"{default:.0f} | {last:.0f} | {default / last:.2f}x |")


if __name__ == "__main__":
    main()
