"""Where a cross-validated model fails: nerve Dice by image format and by true nerve size.

    python studies/cv_breakdown.py RUN/cv_plain/per_image.csv --data ../shared/data/usgra-seg

usgra-seg gives no region or subject labels, so the two groupings it does allow are the frame format
(mode and size, which follow the scanner preset: 512x512 grey, 534x512 RGB, 761x632 RGB), the
area of the expert's nerve mask (quartiles, in original pixels) and its number of separate regions
(several for brachial-plexus trunks; scipy.ndimage.label, 8-connected). Prints one markdown table each:
images, Dice mean ± SD, median, complete misses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe, mean_sd, read_rows  # noqa: E402


def table(title: str, groups: dict[str, list[dict]]) -> str:
    lines = [f"| {title} | images | nerve Dice (mean ± SD) | median | complete misses |", "| --- | ---: | --- | ---: | ---: |"]
    for name, rows in groups.items():
        d = describe(rows)
        lines.append(f"| {name} | {d['n']} | {mean_sd(d)} | {d['dice_median']:.3f} | {d['zero_overlap']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("per_image", type=Path, help="an evaluate folder's per_image.csv (e.g. the --subset cv one)")
    ap.add_argument("--data", required=True, type=Path, help="the dataset folder (images/ read for their format)")
    args = ap.parse_args()
    rows = read_rows(args.per_image)
    by_format: dict[str, list[dict]] = {}
    for row in rows:
        with Image.open(args.data / "images" / f"{row['stem']}.png") as image:
            key = f"{'grey' if image.mode in ('L', 'I;16', 'I') else image.mode} {image.width}x{image.height}"
        by_format.setdefault(key, []).append(row)
    print(table("frame format", dict(sorted(by_format.items()))))
    print()
    areas = np.array([int(r["area_truth_px"]) for r in rows])
    order = np.argsort(areas, kind="stable")
    by_size = {}
    for q, part in enumerate(np.array_split(order, 4), start=1):
        lo, hi = areas[part].min(), areas[part].max()
        by_size[f"Q{q}: {lo:,}-{hi:,} px"] = [rows[i] for i in part]
    print(table("true nerve area (quartile)", by_size))
    print()
    by_regions: dict[str, list[dict]] = {}
    for row in rows:
        with Image.open(args.data / "masks" / f"{row['stem']}.png") as mask:
            nerve = np.asarray(mask) == 1
        n = ndimage.label(nerve, structure=np.ones((3, 3)))[1]
        by_regions.setdefault("1" if n == 1 else "2" if n == 2 else "3 or more", []).append(row)
    print(table("nerve regions in the expert mask", dict(sorted(by_regions.items()))))


if __name__ == "__main__":
    main()
