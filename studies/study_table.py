"""Tables of issue 10's accuracy study (docs/benchmarks.md), from the runs studies/accuracy_study.sh wrote.

Usage: python studies/study_table.py [OUT]   (default runs/study)

- screening: each lever vs the paper recipe, per-image nerve Dice pooled over folds 0 and 1, paired
  Wilcoxon signed-rank test on the same images;
- cross-validation: every ``*_nerveseg/cv_*`` evaluation (5 folds, each image scored by the fold
  model that never saw it), nerve and vessel, and SA-UNet vs U-Net paired per image;
- learning curve: ``curve_*`` runs scored on fold 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import column, describe, read_rows  # noqa: E402

from nerveseg.evaluation.statistics import paired_wilcoxon  # noqa: E402

LEVERS = ("paper_last", "vessels", "dice_ce", "deep_sup", "nnaug", "hflip", "poly")


def summary(rows: list[dict]) -> tuple[float, float, float, int, int]:
    """(mean, SD, median of nerve Dice, complete misses, n)."""
    d = describe(rows)
    return d["dice_mean"], d["dice_sd"], d["dice_median"], d["zero_overlap"], d["n"]


def tagged(rows, arch, fold=""):
    return [{**r, "arch": arch, "seed": 0, "fold": fold} for r in rows]


def screening(root: Path) -> None:
    print("| lever | folds | nerve Dice (mean ± SD) | median | zero-overlap | n | median diff vs paper | p (Wilcoxon) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    pooled = {}
    for lever in LEVERS:
        rows = []
        for fold in (0, 1):
            path = root / f"{lever}_f{fold}" / "eval" / "per_image.csv"
            if path.is_file():
                rows += tagged(read_rows(path), lever, fold)
        if rows:
            pooled[lever] = rows
    for lever, rows in pooled.items():
        mean, sd, median, zero, n = summary(rows)
        folds = ",".join(sorted({str(r["fold"]) for r in rows}))
        test = "--"
        diff = "--"
        if lever != "paper_last" and "paper_last" in pooled:
            w = paired_wilcoxon(pooled["paper_last"] + rows, lever, "paper_last")
            diff, test = f"{w['median_difference']:+.3f}", f"{w['p_value']:.3g} (n={w['n']})"
        print(f"| {lever} | {folds} | {mean:.3f} ± {sd:.3f} | {median:.3f} | {zero}/{n} ({100 * zero / n:.1f}%) | {n} | {diff} | {test} |")


def cross_validation(root: Path) -> None:
    print("\n| run | evaluation | class | Dice (mean ± SD) | median | HD95 (px) | pooled AUC | zero-overlap | n |")
    print("| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: |")
    for metrics_path in sorted(root.glob("*_nerveseg/cv_*/metrics.json")):
        m = json.loads(metrics_path.read_text())
        classes = m.get("classes") or {"nerve": m}
        for name, c in classes.items():
            rows = read_rows(metrics_path.parent / ("per_image.csv" if name == "nerve" else f"per_image_{name}.csv"))
            mean, sd, median, zero, n = summary(rows)
            hd95 = c["hd95"]
            print(f"| {metrics_path.parent.parent.name} | {metrics_path.parent.name[3:]} | {name} | {mean:.3f} ± {sd:.3f} | "
                  f"{median:.3f} | {hd95['mean']:.1f} ± {hd95['sd']:.1f} | {c['pooled_auc']:.4f} | {zero}/{n} ({100 * zero / n:.1f}%) | {n} |")
    pairs = [("sa_unet_nerveseg", "unet_nerveseg")]
    for a, b in pairs:
        pa, pb = root / a / "cv_plain" / "per_image.csv", root / b / "cv_plain" / "per_image.csv"
        if pa.is_file() and pb.is_file():
            w = paired_wilcoxon(tagged(read_rows(pa), a) + tagged(read_rows(pb), b), a, b)
            print(f"\n{a} vs {b} (nerve Dice, paired per image): median difference {w['median_difference']:+.4f}, "
                  f"p = {w['p_value']:.3g}, n = {w['n']}")
    base = root / "sa_unet_nerveseg" / "cv_plain" / "per_image.csv"
    for tag in ("tta", "largest_nerve", "largest_both"):
        other = root / "sa_unet_nerveseg" / f"cv_{tag}" / "per_image.csv"
        if base.is_file() and other.is_file():
            w = paired_wilcoxon(tagged(read_rows(other), tag) + tagged(read_rows(base), "plain"), tag, "plain")
            print(f"sa_unet_nerveseg {tag} vs plain (nerve Dice): median difference {w['median_difference']:+.4f}, "
                  f"p = {w['p_value']:.3g}, n = {w['n']}")


def fold_evaluations(root: Path, name: str) -> list[dict]:
    """Per-image rows of an --all-folds run whose folds were scored one by one (fold_k/eval)."""
    rows = []
    for path in sorted((root / name).glob("fold_*/eval/per_image.csv")):
        rows += read_rows(path)
    return rows


def saunet_vs_unet(root: Path) -> None:
    """SA-UNet vs U-Net under the same recipe, on the images both have scored."""
    sa_path = root / "sa_unet_nerveseg" / "cv_plain" / "per_image.csv"
    unet = (read_rows(root / "unet_nerveseg" / "cv_plain" / "per_image.csv")
            if (root / "unet_nerveseg" / "cv_plain" / "per_image.csv").is_file() else fold_evaluations(root, "unet_nerveseg"))
    if not (sa_path.is_file() and unet):
        return
    stems = {r["stem"] for r in unet}
    sa = [r for r in read_rows(sa_path) if r["stem"] in stems]
    print("\n| architecture (recipe nerveseg) | params | nerve Dice (mean ± SD) | median | HD95 (px) | zero-overlap | n |")
    print("| --- | ---: | --- | ---: | --- | ---: | ---: |")
    from nerveseg.models import count_parameters, create

    for name, rows, arch in (("SA-UNet", sa, "sa_unet"), ("U-Net", unet, "unet")):
        mean, sd, median, zero, n = summary(rows)
        hd95 = column(rows, "hd95")
        m95, sd95 = hd95.mean(), hd95.std(ddof=1)
        params = count_parameters(create(arch, out_channels=2))
        print(f"| {name} | {params:,} | {mean:.3f} ± {sd:.3f} | {median:.3f} | {m95:.1f} ± {sd95:.1f} | {zero}/{n} ({100 * zero / n:.1f}%) | {n} |")
    w = paired_wilcoxon(tagged(sa, "sa") + tagged(unet, "unet"), "sa", "unet")
    print(f"\nSA-UNet minus U-Net, paired per image: median {w['median_difference']:+.4f}, p = {w['p_value']:.3g}, n = {w['n']}")


CURVE_ARMS = (  # (run prefix, column title); the second of each kind is the `curve2` phase
    ("curve_scratch", "from scratch, 300 steps"),
    ("curve_scratch1200", "from scratch, 1200 steps"),
    ("curve_finetune", "fine-tuned, lr 2e-4, 300 steps"),
    ("curve_finetune_lr5e-5", "fine-tuned, lr 5e-5, 300 steps"),
)


def learning_curve(root: Path) -> None:
    def rows_of(prefix: str, size: int):
        path = root / f"{prefix}_n{size}" / "eval" / "per_image.csv"
        return read_rows(path) if path.is_file() else None

    arms = [(prefix, title) for prefix, title in CURVE_ARMS if rows_of(prefix, 5) is not None]
    print("\n| training images | " + " | ".join(f"{title}: Dice | misses" for _, title in arms) + " |")
    print("| ---: |" + " --- | ---: |" * len(arms))
    pre = root / "curve_pretrain" / "eval" / "per_image.csv"
    if pre.is_file():
        mean, sd, median, zero, n = summary(read_rows(pre))
        cells = [f"{mean:.3f} ± {sd:.3f} | {zero}/{n}" if "fine" in prefix else "-- | --" for prefix, _ in arms]
        print("| 0 (the folds-3-4 model alone) | " + " | ".join(cells) + " |")
    tests = []
    for size in (5, 10, 20, 50):
        cells, by_arm = [], {}
        for prefix, _ in arms:
            rows = rows_of(prefix, size)
            by_arm[prefix] = rows
            if rows is None:
                cells.append("-- | --")
                continue
            mean, sd, median, zero, n = summary(rows)
            cells.append(f"{mean:.3f} ± {sd:.3f} | {zero}/{n}")
        print(f"| {size} | " + " | ".join(cells) + " |")
        scratch = [p for p, _ in arms if "scratch" in p and by_arm.get(p)]
        for ft in [p for p, _ in arms if "finetune" in p and by_arm.get(p)]:
            if scratch:  # each fine-tuning arm against the best-trained scratch arm
                w = paired_wilcoxon(tagged(by_arm[ft], "ft") + tagged(by_arm[scratch[-1]], "scratch"), "ft", "scratch")
                tests.append(f"- N = {size}: {ft} minus {scratch[-1]}: median {w['median_difference']:+.3f}, p = {w['p_value']:.3g}")
    print()
    print("\n".join(tests))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, default=Path("runs/study"), help="the study's folder (default runs/study)")
    root = ap.parse_args().out
    screening(root)
    cross_validation(root)
    saunet_vs_unet(root)
    learning_curve(root)
