"""Cost of the larger ImageNet encoders of ``efficientnet_unet`` (Lite0, Lite1, Lite2) on this machine.

For each encoder, in one run (so only the ratios between them count): parameters, the training step
(batch 4 at SIZE px, fp32, channels_last, Adam, BCE on logits; the median of REPEATS steps after two
warm-up steps) and the network's inference through onnxruntime (1 x SIZE x SIZE, the exported graph with
BatchNorm folded, as the shipped model runs; per round the fastest of 5 runs after one warm-up, then the
median over rounds). The variants are measured round-robin, REPEATS rounds,
so a slow spell of the machine falls on all of them; one onnxruntime session lives at a time (an idle
session's threads spin and would steal the CPU from the one being timed, see latency.py).

    python benchmarks/encoder_variants.py [--size 256] [--threads 2] [--repeats 7] [--out docs/results/encoder_variants.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nerveseg.inference.onnx_export import export_onnx
from nerveseg.io_utils import atomic_write_json
from nerveseg.models import create

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import cpu_name, ort_session  # noqa: E402

ENCODERS = ("lite0", "lite1", "lite2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(4, 1, args.size, args.size).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(4, 1, args.size, args.size) > 0.9).float()
    frame = np.random.default_rng(0).random((1, 1, args.size, args.size), dtype=np.float32)

    steps, graphs, params = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ENCODERS:
            model = create("efficientnet_unet", encoder=name)
            params[name] = sum(p.numel() for p in model.parameters())
            graphs[name] = export_onnx(model.eval(), Path(tmp) / f"{name}.onnx", in_channels=1)
            model = model.train().to(memory_format=torch.channels_last)
            optimizer = torch.optim.Adam(model.parameters(), 1e-3)

            def step(model=model, optimizer=optimizer):  # bound now: each variant keeps its own model
                optimizer.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
                loss.backward()
                optimizer.step()

            for _ in range(2):
                step()
            steps[name] = step
        train_s = {name: [] for name in ENCODERS}
        infer_ms = {name: [] for name in ENCODERS}
        for _ in range(args.repeats):
            for name in ENCODERS:
                t = time.perf_counter()
                steps[name]()
                train_s[name].append(time.perf_counter() - t)
        for _ in range(args.repeats):
            for name in ENCODERS:
                session = ort_session(graphs[name], args.threads, "ORT_ENABLE_ALL")
                feed = {session.get_inputs()[0].name: frame}
                session.run(None, feed)  # warm-up
                times = []
                for _ in range(5):
                    t = time.perf_counter()
                    session.run(None, feed)
                    times.append(1000 * (time.perf_counter() - t))
                infer_ms[name].append(min(times))
                del session

    report = {"command": "python " + " ".join(sys.argv), "cpu": cpu_name(), "machine": platform.machine(),
              "torch": torch.__version__, "threads": args.threads, "size": args.size, "date": time.strftime("%Y-%m-%d"),
              "encoders": {}}
    base_step, base_infer = statistics.median(train_s["lite0"]), statistics.median(infer_ms["lite0"])
    for name in ENCODERS:
        step_s, infer = statistics.median(train_s[name]), statistics.median(infer_ms[name])
        report["encoders"][name] = {"parameters": params[name], "train_step_s": round(step_s, 3),
                                    "train_step_vs_lite0": round(step_s / base_step, 2),
                                    "onnx_ms": round(infer, 1), "onnx_vs_lite0": round(infer / base_infer, 2)}
        print(f"{name}: {params[name]:,} parameters, training step {step_s:.3f} s ({step_s / base_step:.2f}x lite0), "
              f"onnxruntime {infer:.1f} ms at {args.size} px ({infer / base_infer:.2f}x)")
    if args.out:
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
