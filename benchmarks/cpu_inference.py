"""CPU inference latency at 512x512, batch 1: median of repeated forward passes.

Usage: python benchmarks/cpu_inference.py [--threads 2] [--repeats 20] [--archs sa_unet,unet]
Prints a Markdown table; speeds are compared as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import platform

import torch

from nerveseg.models import count_gflops, count_parameters, create
from nerveseg.models.complexity import cpu_latency_ms


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
        default = cpu_latency_ms(model, args.size, args.size, args.repeats, channels_last=False)
        last = cpu_latency_ms(model, args.size, args.size, args.repeats, channels_last=True)
        print(f"| {name} | {count_parameters(model):,} | {count_gflops(model, args.size, args.size):.1f} | "
              f"{default:.0f} | {last:.0f} | {default / last:.2f}x |")


if __name__ == "__main__":
    main()
