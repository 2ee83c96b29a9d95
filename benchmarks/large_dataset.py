"""Training on a set larger than memory: the on-disk cache (``--data-cache disk``) vs the in-memory path.

1. Generates FRAMES synthetic FRAME_SIZE x FRAME_SIZE ultrasound-like frames (speckled background,
   a hypoechoic ellipse with a bright rim = the nerve) with masks, as PNG files in a dataset folder
   (skipped when the folder already holds them).
2. Trains ``nerveseg train --data-cache disk`` on all of them for EPOCHS epochs in a child process,
   sampling the resident memory (RSS) of the child and its DataLoader workers every 0.2 s; reports
   the peak of their sum, the cache build time, and images/s per epoch (history.csv).
3. On a subset that fits in memory (COMPARE frames), trains one epoch with each path and reports
   images/s for both, measured in the same call.

    python benchmarks/large_dataset.py --frames 50000 --out /tmp/nerveseg_large --json docs/results/large_dataset.json

The network is a small U-Net (``--features``): the point is the data path; at 256 px a full SA-UNet
needs ~50 ms per image on this 2-core CPU, i.e. 1.4 h per 100,000 images.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import date
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image


def _frame(args) -> None:
    index, folder, side = args
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7, 2) * side
    ry, rx = rng.uniform(0.06, 0.14, 2) * side
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    image = 0.45 + 0.15 * rng.standard_normal((side, side)).astype(np.float32)
    image[r < 1] -= 0.25
    image[(r >= 1) & (r < 1.5)] += 0.3
    image *= rng.rayleigh(0.8, (side, side)).astype(np.float32)
    name = f"{index:06d}.png"
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / "images" / name, compress_level=1)
    Image.fromarray((r < 1).astype(np.uint8)).save(folder / "masks" / name, compress_level=1)


def generate(folder: Path, frames: int, side: int, processes: int) -> float:
    """Write the dataset (images/xxxxxx.png, masks/ alike); returns seconds (0 if present)."""
    marker = folder / f".complete_{frames}_{side}"
    if marker.exists():
        return 0.0
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Pool(processes) as pool:
        pool.map(_frame, [(i, folder, side) for i in range(frames)], chunksize=256)
    marker.touch()
    return time.perf_counter() - t0


def _tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return total


def train_and_watch(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd``; sample the RSS of its process tree; returns peak bytes and wall seconds."""
    peak = 0
    with log_path.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def watch():
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_rss_bytes(proc.pid))
                stop.wait(0.2)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        rc = proc.wait()
        stop.set()
        thread.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log_path}")
    return {"peak_rss_bytes": peak, "wall_seconds": time.perf_counter() - t0}


def epochs_images_per_second(run: Path, n_images: int) -> list[float]:
    with (run / "history.csv").open(newline="") as f:
        return [n_images / float(r["seconds"]) for r in csv.DictReader(f)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--frame-size", type=int, default=256)
    ap.add_argument("--size", type=int, default=128, help="network input side (frames are letterboxed to it)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--compare", type=int, default=2000, help="frames for the memory vs disk comparison (0: skip)")
    ap.add_argument("--features", default="4,8,16,32,64")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/nerveseg_large"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / f"data_{args.frames}_{args.frame_size}"
    gen_seconds = generate(data, args.frames, args.frame_size, processes=os.cpu_count() or 1)
    print(f"dataset {data}: {args.frames} frames ({gen_seconds:.0f} s to generate)", flush=True)
    features = json.dumps({"features": [int(f) for f in args.features.split(",")]})
    common = ["--arch", "unet", "--model-kwargs", features, "--size", str(args.size), "--batch-size", str(args.batch_size),
              "--val-fraction", "0", "--label", "1", "--augment", "shear", "--threads", str(args.threads), "--quiet"]
    nerveseg = [sys.executable, "-m", "nerveseg", "train"]
    cache_dir = args.out / "cache"

    result = {"command": "python benchmarks/large_dataset.py " + " ".join(sys.argv[1:]), "date": date.today().isoformat(),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}",
              "frames": args.frames, "frame_size": args.frame_size, "network_input": args.size, "epochs": args.epochs,
              "features": args.features, "batch_size": args.batch_size, "loader_workers": args.workers,
              "generate_seconds": round(gen_seconds, 1)}
    run = args.out / f"run_disk_{args.frames}"
    if (run / "config.json").exists():
        import shutil

        shutil.rmtree(run)
    watched = train_and_watch(nerveseg + ["--data", str(data), "--out", str(run), "--epochs", str(args.epochs),
                                          "--data-cache", "disk", "--cache-dir", str(cache_dir),
                                          "--loader-workers", str(args.workers), *common], args.out / "train_disk.log")
    rates = epochs_images_per_second(run, args.frames)
    epoch_seconds = sum(args.frames / r for r in rates)
    cache_bytes = sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
    result.update(peak_rss_gb=round(watched["peak_rss_bytes"] / 2**30, 2), wall_seconds=round(watched["wall_seconds"], 1),
                  cache_gb=round(cache_bytes / 2**30, 2),
                  cache_build_and_startup_seconds=round(watched["wall_seconds"] - epoch_seconds, 1),
                  disk_images_per_second=[round(r, 1) for r in rates])
    print(json.dumps(result, indent=2), flush=True)

    if args.compare:
        sub = args.out / f"data_{args.compare}_{args.frame_size}"
        if not (sub / ".complete").exists():  # the first frames of the big set, linked
            for kind in ("images", "masks"):
                (sub / kind).mkdir(parents=True, exist_ok=True)
                for i in range(args.compare):
                    dst = sub / kind / f"{i:06d}.png"
                    if not dst.exists():
                        os.link(data / kind / f"{i:06d}.png", dst)
            (sub / ".complete").touch()
        compare = {}
        for path in ("memory", "disk"):
            run_c = args.out / f"run_{path}_{args.compare}"
            if run_c.exists():
                import shutil

                shutil.rmtree(run_c)
            # two epochs: the second shows the steady state (the first includes the workers' start)
            extra = ["--data-cache", "disk", "--cache-dir", str(cache_dir), "--loader-workers", str(args.workers)] if path == "disk" else []
            w = train_and_watch(nerveseg + ["--data", str(sub), "--out", str(run_c), "--epochs", "2", *extra, *common],
                                args.out / f"train_{path}_{args.compare}.log")
            compare[path] = {"images_per_second": [round(r, 1) for r in epochs_images_per_second(run_c, args.compare)],
                             "peak_rss_gb": round(w["peak_rss_bytes"] / 2**30, 2)}
        result["compare_frames"] = args.compare
        result["compare"] = compare
        print(json.dumps(compare, indent=2), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
