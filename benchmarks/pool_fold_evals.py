"""Pool the held-out evaluations of fold runs that have finished (before the ensemble exists).

    python benchmarks/pool_fold_evals.py RUN/fold_0/eval RUN/fold_1/eval ... [--against OTHER/cv_plain/per_image.csv ...]

Each argument is an ``nerveseg evaluate --subset val`` folder of one fold model. Prints, for the union
of their images, nerve Dice mean ± SD, median, zero-overlap and HD95, one line per fold, and, for each
``--against`` table, the paired two-sided Wilcoxon signed-rank test on per-image Dice over the images
both hold (scipy). The same numbers ``evaluate --subset cv`` gives once every fold has finished.

``--out DIR`` also writes the pooled ``per_image.csv``, ``roc.npz`` and ``metrics.json`` in
``evaluate``'s format (the model card reads it): for fold models that cannot form one ensemble
folder, such as 2-member ensembles per fold.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

from nerveseg.evaluation.evaluate import PER_IMAGE_FIELDS, SUMMARY_KEYS, load_roc_histograms, save_roc_histograms, write_per_image
from nerveseg.evaluation.metrics import RocAccumulator, summarize
from nerveseg.io_utils import atomic_write_json


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
    ap.add_argument("--out", type=Path, default=None, help="write the pooled per_image.csv, roc.npz and metrics.json here")
    args = ap.parse_args()
    pooled: dict[str, dict] = {}
    for folder in args.evals:
        rows = load(folder / "per_image.csv")
        print(f"{folder}: {describe(rows)}")
        pooled.update(rows)
    print(f"pooled: {describe(pooled)}")
    if args.out:
        write_pooled(args.evals, pooled, args.out)
    for other_path in args.against:
        other = load(other_path)
        stems = sorted(set(pooled) & set(other))
        a = np.array([float(pooled[s]["dice"]) for s in stems])
        b = np.array([float(other[s]["dice"]) for s in stems])
        p = wilcoxon(a, b).pvalue if np.any(a != b) else 1.0
        print(f"vs {other_path}: {a.mean():.3f} vs {b.mean():.3f} on the same {len(stems)} images, "
              f"median difference {np.median(a - b):+.3f}, Wilcoxon p = {p:.3g}")


def write_pooled(evals: list[Path], pooled: dict[str, dict], out: Path) -> dict:
    """evaluate's metrics.json for the union of the folds' images (summarize over their rows, the
    pixel ROC pooled from each fold's roc.npz, the threshold their metrics.json share)."""
    if len(pooled) != sum(len(load(f / "per_image.csv")) for f in evals):
        raise SystemExit("the evaluations share images: pooling them would count an image twice")
    thresholds = {json.loads((f / "metrics.json").read_text())["threshold"] for f in evals if (f / "metrics.json").exists()}
    if len(thresholds) > 1:
        raise SystemExit(f"the evaluations used different thresholds {sorted(thresholds)}: their figures do not pool")
    rows = [{k: (None if r[k] == "" else r[k]) for k in PER_IMAGE_FIELDS} for r in pooled.values()]
    for r in rows:
        r["truth_empty"] = int(r["area_truth_px"]) == 0
        r["zero_overlap"] = bool(int(r["zero_overlap"]))
    roc = RocAccumulator()
    for folder in evals:
        part = load_roc_histograms(folder / "roc.npz")
        roc.pos_hist = roc.pos_hist + part.pos_hist
        roc.neg_hist = roc.neg_hist + part.neg_hist
    out.mkdir(parents=True, exist_ok=True)
    write_per_image(out / "per_image.csv", [{**r, "zero_overlap": int(r["zero_overlap"])} for r in rows])
    save_roc_histograms(roc, out / "roc.npz")
    summary = summarize(rows, keys=SUMMARY_KEYS)
    summary.update({"pooled_auc": roc.auc(), "threshold": thresholds.pop() if thresholds else None, "subset": "cv (pooled fold evaluations)",
                    "evaluations": [str(f) for f in evals]})
    atomic_write_json(out / "metrics.json", summary)
    return summary


if __name__ == "__main__":
    main()
