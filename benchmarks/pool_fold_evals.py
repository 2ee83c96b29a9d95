"""Pool the held-out evaluations of fold runs that have finished (before the ensemble exists).

    python benchmarks/pool_fold_evals.py RUN/fold_0/eval RUN/fold_1/eval ... [--against OTHER/cv_plain/per_image.csv ...]

Each argument is an ``nerveseg evaluate --subset val`` folder of one fold model. Prints, for the union
of their images, nerve Dice mean ± SD, median, zero-overlap and HD95, one line per fold, and, for each
``--against`` table, the paired two-sided Wilcoxon signed-rank test on per-image Dice over the images
both hold (scipy). The same numbers ``evaluate --subset cv`` gives once every fold has finished.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon


def load(path: Path) -> dict[str, dict]:
    with path.open(newline="") as f:
        return {row["stem"]: row for row in csv.DictReader(f)}


def describe(rows: dict[str, dict]) -> str:
    dice = np.array([float(r["dice"]) for r in rows.values()])
    hd95 = np.array([float(r["hd95"]) for r in rows.values()])
    misses = sum(int(r["zero_overlap"]) for r in rows.values())
    return (f"Dice {dice.mean():.3f} ± {dice.std(ddof=1):.3f} (median {np.median(dice):.3f}), "
            f"HD95 {hd95.mean():.1f} px, zero-overlap {misses}/{len(rows)} ({100 * misses / len(rows):.1f}%), n = {len(rows)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", nargs="+", type=Path)
    ap.add_argument("--against", nargs="*", type=Path, default=[])
    args = ap.parse_args()
    pooled: dict[str, dict] = {}
    for folder in args.evals:
        rows = load(folder / "per_image.csv")
        print(f"{folder}: {describe(rows)}")
        pooled.update(rows)
    print(f"pooled: {describe(pooled)}")
    for other_path in args.against:
        other = load(other_path)
        stems = sorted(set(pooled) & set(other))
        a = np.array([float(pooled[s]["dice"]) for s in stems])
        b = np.array([float(other[s]["dice"]) for s in stems])
        p = wilcoxon(a, b).pvalue if np.any(a != b) else 1.0
        print(f"vs {other_path}: {a.mean():.3f} vs {b.mean():.3f} on the same {len(stems)} images, "
              f"median difference {np.median(a - b):+.3f}, Wilcoxon p = {p:.3g}")


if __name__ == "__main__":
    main()
