"""Fit the anatomy router of a shipped model pair and say how well it routes patients it never saw.

    python studies/anatomy_router.py --route wrist ../shared/data/mn-wrist --route nerves ../shared/data/usgra-seg \
        [--size 256] [--folds 5] --out ROUTER_FOLDER [--json SUMMARY.json]

Each ``--route NAME DATA...`` names a route (the model an image should go to) and the data folders of
its images (masks are not needed). The router (``nerveseg.models.anatomy_router``: frozen ImageNet
EfficientNet-Lite0 trunk to stride 16, a logistic-regression probe) is cross-validated over
subject-grouped folds made within each route, then fitted on every image and written to ROUTER_FOLDER
(router.safetensors, router.json with the cross-validated accuracy). Needs the ``pretrained`` extra.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nerveseg.data.samples import discover_datasets
from nerveseg.io_utils import atomic_write_json
from nerveseg.training.router import fit_router, save_router


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--route", nargs="+", action="append", required=True, metavar=("NAME", "DATA"),
                    help="a route's name, then the data folders of its images")
    ap.add_argument("--size", type=int, default=256, help="network input size the router reads (default 256)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True, help="folder for router.safetensors and router.json")
    ap.add_argument("--json", type=Path, default=None, help="also write the cross-validation summary here")
    args = ap.parse_args(argv)
    samples_by_route = {}
    for name, *folders in args.route:
        if not folders:
            ap.error(f"--route {name}: name it, then give its data folders")
        if name in samples_by_route:
            ap.error(f"--route {name} is given twice")
        samples, problems = discover_datasets(folders if len(folders) > 1 else folders[0], require_masks=False)
        for problem in problems:
            print(f"skipped: {problem}", file=sys.stderr)
        samples_by_route[name] = samples
    start = time.perf_counter()
    router, fit = fit_router(samples_by_route, args.size, folds=args.folds)
    save_router(router, fit, args.out)
    summary = {"routes": {r: {"data": f, "images": fit.images_per_route[r]} for r, *f in args.route},
               "size": fit.size, "folds": fit.folds, "fold_accuracy": fit.fold_accuracy, "accuracy": fit.accuracy,
               "min_true_probability": fit.min_true_probability, "wrong": fit.wrong,
               "seconds": round(time.perf_counter() - start, 1)}
    print(f"router over {', '.join(f'{r} ({n} images)' for r, n in fit.images_per_route.items())}, {fit.size} px: "
          f"{fit.folds}-fold subject-grouped accuracy {fit.accuracy:.4f} (folds "
          f"{', '.join(f'{a:.3f}' for a in fit.fold_accuracy)}), lowest probability of the true route "
          f"{fit.min_true_probability:.3f}, {len(fit.wrong)} wrong{': ' + ', '.join(fit.wrong[:10]) if fit.wrong else ''}; "
          f"wrote {args.out}")
    if args.json:
        atomic_write_json(args.json, summary)
    return summary


if __name__ == "__main__":
    main()
