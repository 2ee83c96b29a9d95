"""Where onnxruntime spends SA-UNet's CPU time, and how its graph optimisation levels compare.

Usage: python benchmarks/ort_profile.py [--arch sa_unet] [--threads 2] [--native]
Prints the per-operator share from ORT's profiler (1 thread, 3 runs) and the median latency of
ORT_ENABLE_BASIC / EXTENDED / ALL at 512x512, batch 1 (untrained weights). With --native: the graph
with nerveseg's fused SAConv operators (nerveseg.inference.native) instead of the standard one.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from nerveseg.inference import native
from nerveseg.inference.onnx_backend import export_onnx
from nerveseg.models import create


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="sa_unet")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--native", action="store_true", help="profile the graph with native fused SAConv operators")
    args = parser.parse_args()
    feed = {"image": np.random.default_rng(0).standard_normal((1, 1, 512, 512), dtype=np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(create(args.arch).eval(), Path(tmp) / "model.onnx", native_saconv=args.native)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if args.native:
            native.register_saconv(options)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        totals: collections.Counter = collections.Counter()
        counts: collections.Counter = collections.Counter()
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                totals[event["args"]["op_name"]] += event["dur"]
                counts[event["args"]["op_name"]] += 1
        grand = sum(totals.values())
        graph = "native SAConv operators" if args.native else "standard operators"
        print(f"{args.arch}: onnxruntime profile, 1 thread, ORT_ENABLE_ALL, 512x512, {graph}")
        for op, us in totals.most_common(12):
            print(f"  {op:<24} {us / 3 / 1000:8.1f} ms/run {100 * us / grand:5.1f}%  nodes={counts[op] // 3}")
        print(f"latency by optimisation level, {args.threads} threads (median of 8):")
        for level in ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            if args.native:
                native.register_saconv(options)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for _ in range(2):
                session.run(None, feed)
            times = []
            for _ in range(8):
                t0 = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - t0) * 1000)
            print(f"  {level:<22} {statistics.median(times):6.0f} ms")


if __name__ == "__main__":
    main()
