"""Pool the held-out evaluations of fold runs that have finished (before the ensemble exists).

    python studies/pool_fold_evals.py RUN/fold_0/eval RUN/fold_1/eval ... [--against OTHER/cv_plain/per_image.csv ...]

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
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import column, describe, load_per_image, mean_sd, paired  # noqa: E402

from nerveseg.evaluation.evaluate import (  # noqa: E402
    PER_IMAGE_FIELDS,
    SUMMARY_KEYS,
    load_roc_histograms,
    save_roc_histograms,
    write_per_image,
)
from nerveseg.evaluation.metrics import RocAccumulator, summarize  # noqa: E402
from nerveseg.io_utils import atomic_write_json  # noqa: E402


def line(rows: dict[str, dict]) -> str:
    d = describe(rows)
    return (f"Dice {mean_sd(d)} (median {d['dice_median']:.3f}), HD95 {d['hd95_mean']:.1f} px, "
            f"zero-overlap {d['zero_overlap']}/{d['n']} ({100 * d['zero_overlap_rate']:.1f}%), n = {d['n']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("evals", nargs="+", type=Path)
    ap.add_argument("--against", nargs="*", type=Path, default=[])
    ap.add_argument("--out", type=Path, default=None, help="write the pooled per_image.csv, roc.npz and metrics.json here")
    args = ap.parse_args()
    pooled: dict[str, dict] = {}
    for folder in args.evals:
        rows = load_per_image(folder / "per_image.csv")
        print(f"{folder}: {line(rows)}")
        pooled.update(rows)
    print(f"pooled: {line(pooled)}")
    if args.out:
        write_pooled(args.evals, pooled, args.out)
    for other_path in args.against:
        other = load_per_image(other_path)
        stems = sorted(set(pooled) & set(other))
        a, b = column(pooled, stems=stems), column(other, stems=stems)
        test = paired(a, b)
        print(f"vs {other_path}: {a.mean():.3f} vs {b.mean():.3f} on the same {len(stems)} images, "
              f"median difference {test['median_difference']:+.3f}, Wilcoxon p = {test['p']:.3g}")


def write_pooled(evals: list[Path], pooled: dict[str, dict], out: Path) -> dict:
    """evaluate's metrics.json for the union of the folds' images (summarize over their rows, the
    pixel ROC pooled from each fold's roc.npz, the threshold their metrics.json share)."""
    if len(pooled) != sum(len(load_per_image(f / "per_image.csv")) for f in evals):
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
