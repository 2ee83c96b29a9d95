"""Training epoch time of SA-UNet vs U-Net, eager vs torch.compile (issue 13: launch-bound training).

On an H200, SA-UNet's many small kernels (1x1, depthwise 3x3, ECA) left the GPU waiting on kernel
launches: an epoch took 2.5x U-Net's. This trains each architecture through ``nerveseg.training.train``
(the real loop: bf16 autocast, channels_last, Adam, augmentation on the device) on N synthetic frames
for E epochs per variant and reports the steady-state epoch time (median of epochs 2..E; epoch 1
holds the compilation) and the SA-UNet / U-Net ratio per variant, all measured in one call:

  eager                 the plain module
  compile               torch.compile(mode="default"): fused elementwise kernels (Inductor/Triton)
  compile-cudagraphs    torch.compile(mode="reduce-overhead"): the same, replayed as CUDA graphs

    python benchmarks/gpu_train_speed.py --out runs/gpu/train_speed.json           # on a GPU
    python benchmarks/gpu_train_speed.py --cpu-check                               # checks the script

--cpu-check runs the same code on the CPU at a tiny size (eager, and compile unless --no-compile):
its numbers check the script, nothing else. Every variant runs in its own try/except; the JSON is
rewritten after each, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nerveseg.config import DataConfig, ModelConfig, PreprocessConfig, RunConfig, TrainConfig
from nerveseg.training import train

VARIANTS = {"eager": None, "compile": "default", "compile-cudagraphs": "reduce-overhead"}


def write_dataset(folder: Path, n: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side]
    for i in range(n):
        cy, cx, ry, rx = rng.uniform(0.3, 0.7) * side, rng.uniform(0.3, 0.7) * side, side / 10, side / 7
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        image = np.clip(0.5 + 0.2 * rng.standard_normal((side, side)) - 0.3 * mask, 0, 1)
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / "images" / f"{i:04d}.png")
        Image.fromarray(mask.astype(np.uint8)).save(folder / "masks" / f"{i:04d}.png")
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="sa_unet,unet")
    ap.add_argument("--variants", default="eager,compile,compile-cudagraphs")
    ap.add_argument("--images", type=int, default=None, help="training frames (default 163, the CV fold size)")
    ap.add_argument("--size", type=int, default=None, help="network input (default 256)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per variant (default 4)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--cpu-check", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="with --cpu-check: eager only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_check:
        print("no CUDA device; pass --cpu-check to check the script on the CPU", file=sys.stderr)
        return 2
    images = args.images or (12 if args.cpu_check else 163)
    size = args.size or (32 if args.cpu_check else 256)
    epochs = args.epochs or (2 if args.cpu_check else 4)
    variants = [v for v in args.variants.split(",") if v]
    if not cuda:
        variants = [v for v in variants if v != "compile-cudagraphs" and not (args.no_compile and v != "eager")]
    device = "cuda" if cuda else "cpu"
    result = {
        "environment": {"device": torch.cuda.get_device_name() if cuda else f"{platform.machine()} CPU",
                        "torch": torch.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "settings": {"images": images, "size": size, "epochs": epochs, "batch_size": args.batch_size,
                     "cpu_check": not cuda},
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "data", images, size)
        for variant in variants:
            for arch in args.archs.split(","):
                key = f"{arch}/{variant}"
                config = RunConfig(
                    model=ModelConfig(arch), preprocess=PreprocessConfig(size),
                    data=DataConfig(str(data), label=1, val_fraction=0.0),
                    train=TrainConfig(epochs=epochs, batch_size=args.batch_size, augment=("shear", "hflip"),
                                      device=device, compile=VARIANTS[variant]))
                t0 = time.perf_counter()
                try:
                    run = train(config, Path(tmp) / key.replace("/", "_"), progress=False, log=lambda m: None)
                    with (run.run_dir / "history.csv").open() as f:
                        seconds = [float(line.split(",")[4]) for line in f.read().splitlines()[1:]]
                    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
                    result["runs"][key] = {"epoch_seconds": seconds, "steady_epoch_seconds": steady,
                                           "first_epoch_seconds": seconds[0], "wall_seconds": time.perf_counter() - t0}
                except Exception as exc:  # one variant failing must not cost the others
                    result["runs"][key] = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
                print(key, json.dumps(result["runs"][key]), flush=True)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(result, indent=2) + "\n")
    ratios = {}
    for variant in variants:
        sa, un = result["runs"].get(f"sa_unet/{variant}", {}), result["runs"].get(f"unet/{variant}", {})
        if "steady_epoch_seconds" in sa and "steady_epoch_seconds" in un:
            ratios[variant] = round(sa["steady_epoch_seconds"] / un["steady_epoch_seconds"], 2)
    eager_sa = result["runs"].get("sa_unet/eager", {}).get("steady_epoch_seconds")
    speedups = {v: round(eager_sa / result["runs"][f"sa_unet/{v}"]["steady_epoch_seconds"], 2)
                for v in variants if eager_sa and "steady_epoch_seconds" in result["runs"].get(f"sa_unet/{v}", {})}
    result["sa_unet_over_unet_epoch_time"] = ratios
    result["sa_unet_speedup_over_eager"] = speedups
    print("SA-UNet / U-Net epoch time:", ratios)
    print("SA-UNet speed-up over eager:", speedups)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
