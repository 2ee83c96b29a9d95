"""Score averages of fold models (ensembles of any size) against one reference run, on held-out folds.

    python benchmarks/member_sets.py --data DATA --reference RUN [--folds 1] [--thresholds 0.5,0.4] \
        --set RUN_A,RUN_B --set RUN_A,RUN_B,RUN_C ...

Every RUN holds ``fold_k/`` runs trained on the same splits (``--folds 5 --fold k``). For each fold
given (default: every fold finished in all runs named), the nerve probabilities of each fold model on
fold k's held-out images (cached in ``fold_k/val_probs.npz`` by ``postprocess_cv.py``) are averaged
over each set's members, cut at each threshold, and scored per image; a row then gives the pooled
nerve Dice, complete misses and the paired two-sided Wilcoxon test (scipy) against the reference
run alone at threshold 0.5, the shipped single model's rule. Printed as a markdown table, and written
to ``--out`` as JSON when given.

Why: deciding how many members an ensemble needs (and which) costs only inference once each
member's fold models exist; this scores every candidate set on exactly the images none of its
members trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

sys.path.insert(0, str(Path(__file__).resolve().parent))
from postprocess_cv import dice, finished_folds, fold_probabilities  # noqa: E402

from nerveseg.data.io import read_mask  # noqa: E402
from nerveseg.data.samples import discover_samples  # noqa: E402
from nerveseg.io_utils import atomic_write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--reference", required=True, type=Path, help="the single run every set is tested against")
    ap.add_argument("--set", dest="sets", action="append", required=True,
                    help="comma-separated runs averaged as one ensemble; repeat for more sets")
    ap.add_argument("--folds", default=None, help="comma-separated held-out folds; default: all finished in every run")
    ap.add_argument("--thresholds", default="0.5", help="comma-separated cut-offs for each set (default 0.5)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    sets = [[Path(r) for r in s.split(",") if r] for s in args.sets]
    runs = sorted({args.reference, *[r for s in sets for r in s]}, key=str)
    common = set.intersection(*[finished_folds(r) for r in runs])
    folds = sorted(int(k) for k in args.folds.split(",")) if args.folds else sorted(common)
    missing = [k for k in folds if k not in common]
    if not folds or missing:
        sys.exit(f"folds {missing or 'none'} are not finished in every run "
                 "(fold_k/model.safetensors and fold_k/eval/metrics.json); train and evaluate them first")
    thresholds = [float(t) for t in args.thresholds.split(",")]
    samples, _ = discover_samples(args.data)
    by_stem = {s.stem: s for s in samples}

    probs: dict[Path, dict[str, np.ndarray]] = {r: {} for r in runs}
    for k in folds:
        for r in runs:
            probs[r].update(fold_probabilities(r / f"fold_{k}", by_stem))
    stems = sorted(probs[args.reference])
    truth = {s: read_mask(by_stem[s].mask_path, label=1, image_shape=probs[args.reference][s].shape) for s in stems}

    def score(members: list[Path], threshold: float) -> tuple[np.ndarray, int]:
        results = [dice(np.mean([probs[m][s].astype(np.float32) for m in members], axis=0) >= threshold, truth[s])
                   for s in stems]
        return np.array([d for d, _ in results]), sum(int(miss) for _, miss in results)

    reference, _ = score([args.reference], 0.5)
    rows = []
    for members in [[args.reference]] + sets:
        for t in thresholds if members != [args.reference] else [0.5]:
            d, misses = score(members, t)
            p = float(wilcoxon(d, reference).pvalue) if np.any(d != reference) else 1.0
            rows.append({"members": [m.name for m in members], "threshold": t, "n": len(stems),
                         "dice_mean": float(d.mean()), "dice_sd": float(d.std(ddof=1)),
                         "dice_median": float(np.median(d)), "zero_overlap": misses,
                         "mean_difference": float((d - reference).mean()), "p": p})
    print(f"held-out folds {','.join(map(str, folds))}, reference {args.reference.name} at threshold 0.5\n")
    print("| members | threshold | n | nerve Dice (mean ± SD) | median | zero-overlap | mean diff | p (Wilcoxon) |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {' + '.join(r['members'])} | {r['threshold']:.2f} | {r['n']} | {r['dice_mean']:.3f} ± {r['dice_sd']:.3f} | "
              f"{r['dice_median']:.3f} | {r['zero_overlap']}/{r['n']} | {r['mean_difference']:+.3f} | {r['p']:.2g} |")
    if args.out:
        atomic_write_json(args.out, {"folds": folds, "reference": args.reference.name, "rows": rows})


if __name__ == "__main__":
    main()
