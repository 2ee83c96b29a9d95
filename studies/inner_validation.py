"""Choose a training length on the training folds' own validation, never on a reported fold.

The benchmark keeps every run's last epoch and scores it on its held-out fold, so how many epochs a
recipe needs must be chosen before, on images that fold never reports. Two steps:

  make-folder  DATA --folds 5 --fold K --out DIR
      DIR/images, DIR/masks (links) and DIR/manifest.csv holding only the *training* patients of
      fold K (the benchmark's own patient-grouped split, same seed), so that ``nerveseg train --data
      DIR --val-fraction 0.2`` validates on patients of fold K's training side only.
  choose-epochs RUN [RUN ...] [--window 5] [--tolerance 0.01]
      from each run's history.csv (val_dice per epoch), the shortest training whose moving average
      of the validation Dice (over ``window`` epochs ending there) is within ``tolerance`` of the
      best moving average: the point where longer training stops paying. With several runs (one
      per architecture), the longest of their choices, so that every architecture converges.

Example (issue 23): python studies/inner_validation.py make-folder ../shared/data/mn-wrist --folds 5
--fold 0 --out runs/paper_wrist/pilot/data_f0
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from nerveseg.data.samples import discover_samples, fold_assignment
from nerveseg.io_utils import atomic_write_csv


def training_side_folder(data: Path, folds: int, fold: int, out: Path, seed: int = 0) -> dict:
    """Write ``out`` (links to the images and masks of every sample outside ``fold``, and a
    manifest with their subjects). Returns counts of images and subjects on each side."""
    samples, problems = discover_samples(data)
    if problems:
        raise SystemExit(f"{data}: {len(problems)} unreadable pair(s), e.g. {problems[0]}: fix the data first")
    assignment = fold_assignment(samples, folds, seed)
    kept = [s for s in samples if s.stem in assignment and assignment[s.stem] != fold]
    held = [s for s in samples if assignment.get(s.stem) == fold]
    shared = {s.subject for s in kept} & {s.subject for s in held}
    if shared:  # fold_assignment never splits a subject; this is the check a reader can see
        raise SystemExit(f"subjects on both sides of fold {fold}: {sorted(shared)[:5]}")
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for s in kept:
        for path, sub in ((s.image_path, "images"), (s.mask_path, "masks")):
            link = out / sub / path.name
            if not link.exists():
                os.symlink(os.path.relpath(path.resolve(), link.parent.resolve()), link)
        rows.append({"file": s.image_path.name, "subject": s.subject, "region": s.region})
    atomic_write_csv(out / "manifest.csv", rows, ["file", "subject", "region"])  # the workspace's manifest writer
    return {"training_images": len(kept), "training_subjects": len({s.subject for s in kept}),
            "held_out_images": len(held), "held_out_subjects": len({s.subject for s in held})}


def read_val_dice(history: Path) -> list[float]:
    with history.open(newline="") as f:
        return [float(r["val_dice"]) for r in csv.DictReader(f)]


def converged_epoch(val_dice: list[float], window: int = 5, tolerance: float = 0.01) -> dict:
    """The first epoch (1-based) whose trailing ``window``-epoch mean of the validation Dice is
    within ``tolerance`` of the best such mean, with the curve's figures."""
    if len(val_dice) < window:
        raise ValueError(f"{len(val_dice)} epochs logged, fewer than the window of {window}")
    means = [sum(val_dice[i - window + 1:i + 1]) / window for i in range(window - 1, len(val_dice))]
    best = max(means)
    first = next(i for i, m in enumerate(means) if m >= best - tolerance)
    return {"epoch": first + window, "moving_mean": round(means[first], 4), "best_moving_mean": round(best, 4),
            "best_at": means.index(best) + window, "epochs_logged": len(val_dice)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-folder", help="a data folder of fold K's training patients only")
    mk.add_argument("data", type=Path)
    mk.add_argument("--folds", type=int, default=5)
    mk.add_argument("--fold", type=int, required=True)
    mk.add_argument("--seed", type=int, default=0, help="the split's seed (the benchmark's seed 0)")
    mk.add_argument("--out", type=Path, required=True)
    ch = sub.add_parser("choose-epochs", help="the training length from the runs' validation curves")
    ch.add_argument("runs", nargs="+", type=Path, help="run folders holding history.csv")
    ch.add_argument("--window", type=int, default=5)
    ch.add_argument("--tolerance", type=float, default=0.01)
    args = ap.parse_args(argv)
    if args.command == "make-folder":
        print(json.dumps(training_side_folder(args.data, args.folds, args.fold, args.out, args.seed)))
        return 0
    choices = {str(run): converged_epoch(read_val_dice(run / "history.csv"), args.window, args.tolerance)
               for run in args.runs}
    print(json.dumps({"runs": choices, "epochs": max(c["epoch"] for c in choices.values())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
