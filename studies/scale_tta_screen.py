"""Screen multi-scale test-time augmentation: each fold model run at several network input sizes
(the shipped 256 px and 192-320 px; SA-UNet is fully convolutional), probabilities averaged over sizes
and, with two runs, over both, scored per image on the fold's held-out images against the first
run at 256 px, threshold 0.5 (paired two-sided Wilcoxon, scipy).

    python studies/scale_tta_screen.py FOLDS RUNS      e.g.  1 sa_unet_e2_dice_ce_poly,sa_unet_e2_seed1

RUNS are names under ``--root`` (runs/study) holding fold_k/ runs; ``--data`` (../shared/data/usgra-seg) is the data. A
screen, printed only: about 3 s per image and run on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import dice, mean_probability, nerve_truth, paired, samples_by_stem  # noqa: E402

SIZES = (192, 224, 256, 288, 320)


def probabilities(runs: list[str], folds: list[int], by_stem: dict, root: Path) -> dict[tuple[str, int], dict]:
    """{(run, size): {stem: probability}} of every fold model on its held-out images at every size."""
    from nerveseg.config import RunConfig
    from nerveseg.data.media import read_frame
    from nerveseg.inference.predictor import Predictor

    res: dict[tuple[str, int], dict] = {}
    for k in folds:
        for r in runs:
            fold_run = root / r / f"fold_{k}"
            predictor = Predictor.from_run(fold_run, device="cpu", tta=False)
            predictor.config.inference.keep_largest = ()
            for stem in RunConfig.load(fold_run / "config.json").val_stems:
                image, _, _ = read_frame(by_stem[stem].image_path, by_stem[stem].frame)
                for size in SIZES:
                    predictor.size = size
                    res.setdefault((r, size), {})[stem] = predictor.predict(image).astype(np.float32)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folds", help="comma-separated held-out folds, e.g. 1")
    ap.add_argument("runs", help="comma-separated run names under --root")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/usgra-seg"))
    ap.add_argument("--root", type=Path, default=Path("runs/study"))
    args = ap.parse_args()
    runs = args.runs.split(",")
    by_stem = samples_by_stem(args.data)
    res = probabilities(runs, [int(x) for x in args.folds.split(",")], by_stem, args.root)
    stems = sorted(res[(runs[0], 256)])
    truth = {s: nerve_truth(by_stem[s], res[(runs[0], 256)][s].shape) for s in stems}

    def score(keys, t=0.5):
        r = [dice(mean_probability([res[k][s] for k in keys]) >= t, truth[s]) for s in stems]
        return np.array([x[0] for x in r]), sum(x[1] for x in r)

    base, _ = score([(runs[0], 256)])
    combos = {f"{r}@{z}": [(r, z)] for r in runs for z in SIZES}
    for r in runs:
        combos[f"{r}@224+256+288"] = [(r, 224), (r, 256), (r, 288)]
        combos[f"{r}@256+288"] = [(r, 256), (r, 288)]
        combos[f"{r}@256+320"] = [(r, 256), (r, 320)]
    if len(runs) > 1:
        combos["pair@256"] = [(r, 256) for r in runs]
        combos["pair@256+288"] = [(r, z) for r in runs for z in (256, 288)]
    for name, keys in combos.items():
        for t in (0.5, 0.4):
            d, m = score(keys, t)
            test = paired(d, base)
            print(f"{name:40s} t={t} {d.mean():.3f} miss {m} diff {test['mean_difference']:+.3f} p {test['p']:.2g}")


if __name__ == "__main__":
    main()
