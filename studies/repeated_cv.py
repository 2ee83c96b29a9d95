"""Repeated cross-validation of one recipe: each repeat is a full patient-grouped CV (every image scored
once by the fold model that never saw it), trained again with another seed or on another day. The
paper reports its figures as means over repeated runs; one CV is one draw, and on these folders a
draw moves the wrist mean by about 0.01, as much as the levers screened against it.

    python studies/repeated_cv.py --repeat NAME EVAL [EVAL ...] --repeat NAME EVAL [EVAL ...] [--json OUT]

Each ``--repeat`` names one repeat and the ``evaluate`` folders (``per_image.csv``) whose images
together make its CV: the five fold evaluations, or one pooled folder. Every repeat must score the
same images, each once. Prints, per data folder (``source``), a markdown table: each repeat's mean
nerve Dice ± SD over images, median, misses and median absolute area error; then the mean over repeats
± SD over repeats of each (the recipe's figure) and each repeat against the first (paired Wilcoxon on
per-image Dice, scipy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import area_agreement_px, column, describe, load_per_image, paired, source_groups  # noqa: E402

from nerveseg.io_utils import atomic_write_json  # noqa: E402


def load_repeat(evals: list[Path]) -> dict[str, dict]:
    """{stem: row} over the evaluation folders of one repeat; an image scored twice is an error."""
    rows: dict[str, dict] = {}
    for folder in evals:
        path = folder / "per_image.csv" if folder.is_dir() else folder
        if not path.is_file():
            raise SystemExit(f"{path}: no per_image.csv (run `nerveseg evaluate` there first)")
        part = load_per_image(path)
        twice = sorted(set(part) & set(rows))
        if twice:
            raise SystemExit(f"{path}: images {twice[:3]} are already in this repeat: a CV scores each image once")
        rows.update(part)
    return rows


def repeat_figures(rows: list[dict]) -> dict:
    """n, Dice mean/SD/median, misses and the median absolute area error (%) of one repeat's rows."""
    d = describe(rows)
    area = area_agreement_px(rows)
    return {"n": d["n"], "dice_mean": d["dice_mean"], "dice_sd": d["dice_sd"], "dice_median": d["dice_median"],
            "zero_overlap": d["zero_overlap"], "median_ape_percent": area["median_ape_percent"]}


def summarize_repeats(repeats: dict[str, dict[str, dict]]) -> dict:
    """Per data folder: each repeat's figures, their mean and SD over repeats (ddof 1; 0 for one repeat),
    and each repeat's per-image Dice against the first repeat's."""
    names = list(repeats)
    stems = sorted(repeats[names[0]])
    for name in names[1:]:
        if sorted(repeats[name]) != stems:
            only = sorted(set(repeats[name]) ^ set(stems))
            raise SystemExit(f"repeat {name!r} does not score the same images as {names[0]!r} "
                             f"(differ on {len(only)}, e.g. {only[:3]}): repeats of a CV must cover the same images")
    first = repeats[names[0]]
    out: dict = {}
    for source, chosen in source_groups(first, stems):
        source = source or "all"
        per_repeat = {name: repeat_figures([repeats[name][s] for s in chosen]) for name in names}
        keys = ("dice_mean", "dice_median", "zero_overlap", "median_ape_percent")
        over = {}
        for key in keys:
            values = np.array([per_repeat[name][key] for name in names], dtype=float)
            over[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        base = column(first, stems=chosen)
        versus = {name: paired(column(repeats[name], stems=chosen), base) for name in names[1:]}
        out[source] = {"n": len(chosen), "repeats": per_repeat, "over_repeats": over, "against_first": versus}
    return out


def markdown(summary: dict, names: list[str]) -> str:
    lines = []
    for source, s in summary.items():
        lines += [f"{source} ({s['n']} images, {len(names)} repeats):", "",
                  "| repeat | nerve Dice | median | misses | median area error |", "| --- | --- | ---: | ---: | ---: |"]
        for name in names:
            r = s["repeats"][name]
            lines.append(f"| {name} | {r['dice_mean']:.3f} ± {r['dice_sd']:.3f} | {r['dice_median']:.3f} | "
                         f"{r['zero_overlap']} | {r['median_ape_percent']:.1f}% |")
        o = s["over_repeats"]
        lines += [f"| **mean ± SD over repeats** | **{o['dice_mean']['mean']:.3f} ± {o['dice_mean']['sd']:.3f}** | "
                  f"{o['dice_median']['mean']:.3f} | {o['zero_overlap']['mean']:.1f} ± {o['zero_overlap']['sd']:.1f} | "
                  f"{o['median_ape_percent']['mean']:.1f} ± {o['median_ape_percent']['sd']:.1f}% |", ""]
        for name, v in s["against_first"].items():
            lines.append(f"- {name} vs {names[0]}: mean difference {v['mean_difference']:+.3f}, median "
                         f"{v['median_difference']:+.3f}, Wilcoxon p = {v['p']:.3g}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", nargs="+", action="append", required=True, metavar=("NAME", "EVAL"),
                    help="a repeat's name, then its evaluation folders (or per_image.csv files)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    repeats: dict[str, dict[str, dict]] = {}
    for name, *evals in args.repeat:
        if not evals:
            ap.error(f"--repeat {name}: name it, then give its evaluation folders")
        if name in repeats:
            ap.error(f"--repeat {name} is given twice")
        repeats[name] = load_repeat([Path(e) for e in evals])
    summary = summarize_repeats(repeats)
    print(markdown(summary, list(repeats)))
    if args.json:
        atomic_write_json(args.json, {"repeats": {n: [str(e) for e in ev] for n, *ev in args.repeat}, "by_source": summary})
    return summary


if __name__ == "__main__":
    main()
