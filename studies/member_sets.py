"""Score averages of fold models (ensembles of any size) against one reference run, on held-out folds.

    python studies/member_sets.py --data DATA --reference RUN [--folds 1] [--thresholds 0.5,0.4] \
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    dice,
    dice_summary,
    fold_probabilities,
    folds_of_every_run,
    mean_probability,
    mean_sd,
    nerve_truth,
    paired,
    samples_by_stem,
)

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
    folds = folds_of_every_run(runs, [int(k) for k in args.folds.split(",")] if args.folds else None)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    by_stem = samples_by_stem(args.data)

    probs: dict[Path, dict[str, np.ndarray]] = {r: {} for r in runs}
    for k in folds:
        for r in runs:
            probs[r].update(fold_probabilities(r / f"fold_{k}", by_stem))
    stems = sorted(probs[args.reference])
    truth = {s: nerve_truth(by_stem[s], probs[args.reference][s].shape) for s in stems}

    def score(members: list[Path], threshold: float) -> tuple[np.ndarray, int]:
        results = [dice(mean_probability([probs[m][s] for m in members]) >= threshold, truth[s]) for s in stems]
        return np.array([d for d, _ in results]), sum(int(miss) for _, miss in results)

    reference, _ = score([args.reference], 0.5)
    rows = []
    for members in [[args.reference]] + sets:
        for t in thresholds if members != [args.reference] else [0.5]:
            d, misses = score(members, t)
            test = paired(d, reference)
            rows.append({"members": [m.name for m in members], "threshold": t, **dice_summary(d, misses),
                         "mean_difference": test["mean_difference"], "p": test["p"]})
    print(f"held-out folds {','.join(map(str, folds))}, reference {args.reference.name} at threshold 0.5\n")
    print("| members | threshold | n | nerve Dice (mean ± SD) | median | zero-overlap | mean diff | p (Wilcoxon) |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {' + '.join(r['members'])} | {r['threshold']:.2f} | {r['n']} | {mean_sd(r)} | "
              f"{r['dice_median']:.3f} | {r['zero_overlap']}/{r['n']} | {r['mean_difference']:+.3f} | {r['p']:.2g} |")
    if args.out:
        atomic_write_json(args.out, {"folds": folds, "reference": args.reference.name, "rows": rows})


if __name__ == "__main__":
    main()
