"""Data folders for the fine-tuning learning curve (issue 10), as symbolic links into DATA.

With the 5-fold split of ``nerveseg train --folds 5 --seed 0``: the "pretrained" model learns
folds 3-4, the small training sets (N = 5, 10, 20, 50 images, nested, seeded) come from folds 1-2,
and every model is scored on fold 0. The three sets are disjoint, so fine-tuning images are new
to the pretrained model, as a user's own images would be, and no score is on a training image.

Usage: python studies/learning_curve_views.py DATA OUT   (writes OUT/pretrain, OUT/n5 ..., OUT/eval)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from nerveseg.data.samples import discover_samples, fold_assignment

SIZES = (5, 10, 20, 50)


def link_view(folder: Path, samples) -> None:
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for s in samples:
        for sub, path in (("images", s.image_path), ("masks", s.mask_path)):
            target = folder / sub / Path(path).name
            if not target.exists():
                os.symlink(Path(path).resolve(), target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="the dataset folder (usgra-seg)")
    ap.add_argument("out", help="where the views' folders are written")
    args = ap.parse_args()
    data, out = args.data, args.out
    samples, _ = discover_samples(data)
    fold = fold_assignment(samples, folds=5, seed=0)
    pool = [s for s in samples if fold[s.stem] in (1, 2)]
    order = np.random.default_rng(0).permutation(len(pool))
    link_view(Path(out) / "pretrain", [s for s in samples if fold[s.stem] in (3, 4)])
    link_view(Path(out) / "eval", [s for s in samples if fold[s.stem] == 0])
    for n in SIZES:  # nested: the 10 contain the 5
        link_view(Path(out) / f"n{n}", [pool[i] for i in sorted(order[:n])])
    print(f"views in {out}: pretrain {sum(fold[s.stem] in (3, 4) for s in samples)}, eval "
          f"{sum(fold[s.stem] == 0 for s in samples)}, pool {len(pool)} images")


if __name__ == "__main__":
    main()
