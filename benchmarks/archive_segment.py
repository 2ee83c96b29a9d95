"""Segmenting an archive on one machine: 1 job vs 2 `--shard` jobs vs 1 job with 2 threads.

    python benchmarks/archive_segment.py [--frames 5000] [--backend auto] [--json FILE] [--work DIR] [--keep]

1. Writes ``--frames`` synthetic ultrasound-like PNGs (speckle and a bright ellipse) of mixed sizes,
   300x300 up to 640x560, into a folder tree: a fifth at the top, the rest in
   ``patient_NNN/{wrist,forearm}/`` with the same file names in every folder (so results only stay
   apart because the output tree mirrors the input tree).
2. Times ``nerveseg segment ROOT --recursive`` with the shipped default model, each configuration into
   its own output folder:

   - ``1 job x 1 thread``:  ``--threads 1``
   - ``2 jobs x 1 thread``: ``--shard 0/2`` and ``--shard 1/2`` at the same time, ``--threads 1`` each
   - ``1 job x 2 threads``: ``--threads 2``

   (``OMP_NUM_THREADS`` is set to the same count, so no library starts more threads behind our back.)
3. Runs ``nerveseg collect`` on each output folder and compares the tables: the 2-job table must be
   byte-identical to the 1-job table (same thread count, same numbers: exit status 1 if not); the
   2-thread table is compared too and reported (a different thread count may sum in another order
   and move a pixel at exactly the threshold).
4. Prints frames/s for each configuration and writes them to ``--json``.

Wall-clock times include starting Python and loading the model (once per job), as a user would see
them. Needs about 25 kB of disk per frame for the inputs and 40 kB per frame per configuration
(5000 frames: ~0.7 GB); what it wrote is deleted at the end unless ``--keep``. On a shared machine,
the numbers are only as good as the cores are idle: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_frames(root: Path, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """n PNGs below root; returns their (height, width)."""
    rng = np.random.default_rng(seed)
    sizes = []
    per_folder = 20
    for i in range(n):
        if i % 5 == 0:
            folder, name = root, f"scan_{i:05d}.png"
        else:
            j = i - i // 5 - 1  # the i-th frame that goes into a patient folder
            patient, side = divmod(j // per_folder, 2)
            folder = root / f"patient_{patient:03d}" / ("wrist" if side == 0 else "forearm")
            name = f"frame_{j % per_folder:03d}.png"  # repeats in every folder
        h, w = int(rng.integers(300, 561)), int(rng.integers(300, 641))
        # speckle at a quarter of the resolution, scaled up: PNGs of realistic size, not of pure noise
        small = 0.25 + 0.06 * rng.standard_normal((h // 4 + 1, w // 4 + 1))
        image = np.kron(small, np.ones((4, 4)))[:h, :w]
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        ry, rx = rng.uniform(0.06, 0.12) * h, rng.uniform(0.08, 0.16) * w
        image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] += 0.35
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(folder / name)
        sizes.append((h, w))
    return sizes


def nerveseg(*args: str, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-m", "nerveseg", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen], what: str) -> None:
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"{what}: exit status {proc.returncode}\n{out}\n{err[-3000:]}")


def timed_segment(root: Path, out: Path, jobs: int, threads: int, backend: str) -> float:
    start = time.perf_counter()
    procs = [nerveseg("segment", str(root), "--recursive", "--out", str(out), "--threads", str(threads),
                      "--backend", backend, *(["--shard", f"{i}/{jobs}"] if jobs > 1 else []), threads=threads)
             for i in range(jobs)]
    finish(procs, f"segment into {out}")
    seconds = time.perf_counter() - start
    finish([nerveseg("collect", str(out), threads=1)], f"collect {out}")
    return seconds


def compare(a: Path, b: Path) -> dict:
    """Byte-identical? If not, how many rows differ and by how much area."""
    import csv

    if a.read_bytes() == b.read_bytes():
        return {"identical": True}
    with open(a, newline="") as fa, open(b, newline="") as fb:
        ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    if len(ra) != len(rb):
        return {"identical": False, "rows": [len(ra), len(rb)]}
    differ = [(x, y) for x, y in zip(ra, rb) if x != y]
    areas = [abs(int(x["area_px"] or 0) - int(y["area_px"] or 0)) for x, y in differ]
    return {"identical": False, "rows_differing": len(differ), "max_area_px_difference": max(areas, default=0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"))
    parser.add_argument("--json", default="docs/archive_segment.json", help="where to write the results")
    parser.add_argument("--work", default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the frames and outputs")
    args = parser.parse_args()
    if args.frames < 1:
        parser.error("--frames must be >= 1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="nerveseg-archive-"))
    work.mkdir(parents=True, exist_ok=True)
    root = work / "archive"
    shutil.rmtree(root, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        sizes = write_frames(root, args.frames)
        print(f"wrote {args.frames} frames ({sum(h * w for h, w in sizes) / args.frames / 1e3:.0f} kpx on average) "
              f"into {root} in {time.perf_counter() - t0:.0f} s", flush=True)
        configs = [("1 job x 1 thread", 1, 1), ("2 jobs x 1 thread", 2, 1), ("1 job x 2 threads", 1, 2)]
        runs, outs = {}, {}
        for name, jobs, threads in configs:
            out = work / f"out_{jobs}x{threads}"
            shutil.rmtree(out, ignore_errors=True)
            seconds = timed_segment(root, out, jobs, threads, args.backend)
            runs[name] = {"jobs": jobs, "threads_per_job": threads, "seconds": round(seconds, 2),
                          "frames_per_s": round(args.frames / seconds, 3)}
            outs[name] = out / "measurements.csv"
            print(f"{name:<20} {seconds:8.1f} s  {args.frames / seconds:7.2f} frames/s", flush=True)
        sharded = compare(outs["1 job x 1 thread"], outs["2 jobs x 1 thread"])
        threaded = compare(outs["1 job x 1 thread"], outs["1 job x 2 threads"])
        print(f"collected table, 2 jobs vs 1 job: {'byte-identical' if sharded['identical'] else sharded}")
        print(f"collected table, 2 threads vs 1 thread: {'byte-identical' if threaded['identical'] else threaded}")
        result = {
            "frames": args.frames, "sizes": "300-560 x 300-640 px (h x w)", "backend": args.backend,
            "model": "shipped default", "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                                      "python": platform.python_version()},
            "runs": runs, "table_2_jobs_vs_1_job": sharded, "table_2_threads_vs_1_thread": threaded,
            "command": "python benchmarks/archive_segment.py " + " ".join(sys.argv[1:]),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
        return 0 if sharded["identical"] else 1
    finally:
        if not args.keep:  # only what this script wrote: --work may be a folder holding other things
            for folder in [root] + [work / f"out_{j}x{t}" for j, t in ((1, 1), (2, 1), (1, 2))]:
                shutil.rmtree(folder, ignore_errors=True)
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
