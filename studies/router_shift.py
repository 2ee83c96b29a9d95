"""Does the anatomy router route by anatomy, or by how a data set's frames happen to look? Checked by shifting them.

    python studies/router_shift.py ROUTER --route wrist ../shared/data/mn-wrist --route nerves ../shared/data/usgra-seg \
        [--json OUT.json]

The two data sets of the shipped router differ in more than anatomy: image size and aspect (mn-wrist 606x468,
usgra-seg about square), machine, gain. A router that learnt those would send a wrist scanned on another machine
to the wrong model. Each image of each ``--route`` is routed as it is and after shifts a scan from another
machine or preset could bring: padded to a square or cropped to one (the other data set's aspect), cropped to
its central 80% (a smaller depth and width), darker and brighter (gamma 1.5 / 0.67), lower contrast (x0.6 about
the mean), speckle-like noise, blurred (sigma 1.5 px). The table gives, per route and shift, the share routed to
its own route and the lowest probability given to it.

These are the router's training images (the shipped router saw every one), so this measures how much each shift
moves its decision, not how well it does on patients it never saw (that is studies/anatomy_router.py's
patient-grouped cross-validation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from nerveseg.data.media import read_frame
from nerveseg.data.preprocess import to_network_input
from nerveseg.data.samples import discover_datasets
from nerveseg.io_utils import atomic_write_json
from nerveseg.training.router import load_router


def _pad_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    side = max(h, w)
    out = np.zeros((side, side), img.dtype)
    out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = img
    return out


def _crop(img: np.ndarray, height: float, width: float) -> np.ndarray:
    h, w = img.shape
    ch, cw = max(1, int(round(h * height))), max(1, int(round(w * width)))
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[top:top + ch, left:left + cw]


def _crop_square(img: np.ndarray) -> np.ndarray:
    side = min(img.shape)
    return _crop(img, side / img.shape[0], side / img.shape[1])


def shifts(seed: int = 0) -> dict:
    """{name: function of a [0, 1] float image}; the noise is seeded per call, so reruns agree."""
    rng = np.random.default_rng(seed)
    return {
        "as it is": lambda x: x,
        "padded to a square": _pad_square,
        "cropped to a square": _crop_square,
        "central 80%": lambda x: _crop(x, 0.8, 0.8),
        "darker (gamma 1.5)": lambda x: x ** 1.5,
        "brighter (gamma 0.67)": lambda x: x ** (1 / 1.5),
        "lower contrast (x0.6)": lambda x: np.clip(x.mean() + 0.6 * (x - x.mean()), 0, 1),
        "noise (sd 0.05)": lambda x: np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1),
        "blurred (sigma 1.5 px)": lambda x: ndimage.gaussian_filter(x, 1.5),
    }


def route_table(router, size: int, images_by_route: dict[str, list[np.ndarray]]) -> list[dict]:
    rows = []
    for shift, fn in shifts().items():
        for index, route in enumerate(router.routes):
            images = images_by_route.get(route, [])
            if not images:
                continue
            probs = []
            for start in range(0, len(images), 8):
                x = torch.cat([to_network_input(fn(img).astype(np.float32), size)[0] for img in images[start:start + 8]])
                probs.append(torch.softmax(router(x), dim=1)[:, index])
            p = torch.cat(probs).numpy()
            rows.append({"shift": shift, "route": route, "n": len(p), "right": int((p > 0.5).sum()),
                         "share_right": float((p > 0.5).mean()), "lowest_probability": float(p.min())})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("router", type=Path, help="a folder written by studies/anatomy_router.py (or a routed model's router/)")
    ap.add_argument("--route", nargs=2, action="append", required=True, metavar=("NAME", "DATA"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    router, info = load_router(args.router)
    router.eval()
    images_by_route = {}
    for name, folder in args.route:
        if name not in router.routes:
            ap.error(f"--route {name}: the router's routes are {router.routes}")
        samples, _ = discover_datasets(folder, require_masks=False)
        images_by_route[name] = [read_frame(s.image_path, s.frame)[0] for s in samples]
    torch.set_num_threads(2)
    rows = route_table(router, int(info.get("size", 256)), images_by_route)
    print("| shift | " + " | ".join(f"{r}: routed right (lowest p)" for r in images_by_route) + " |")
    print("| --- |" + " ---: |" * len(images_by_route))
    for shift in shifts():
        cells = [next(r for r in rows if r["shift"] == shift and r["route"] == route) for route in images_by_route]
        print(f"| {shift} | " + " | ".join(f"{c['right']}/{c['n']} ({c['lowest_probability']:.2f})" for c in cells) + " |")
    if args.json:
        atomic_write_json(args.json, {"router": args.router.name, "routes": list(images_by_route), "rows": rows})
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
