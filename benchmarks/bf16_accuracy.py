"""Does bf16 autocast inference keep accuracy? Dice of one run's validation images, fp32 vs bf16.

Usage: python benchmarks/bf16_accuracy.py RUN DATA
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from nerveseg.data import discover_samples, read_image, read_mask
from nerveseg.evaluation.evaluate import select_subset
from nerveseg.evaluation.metrics import image_metrics
from nerveseg.inference.predictor import Predictor


def main(run: str, data: str) -> None:
    predictor = Predictor.from_run(run, device="cpu")
    samples = select_subset(discover_samples(data)[0], predictor, "val")
    dice = {"fp32": [], "bf16": []}
    max_diff, flipped, pixels = 0.0, 0, 0
    for sample in samples:
        image = read_image(sample.image_path)
        truth = read_mask(sample.mask_path, label=predictor.config.data.label)
        p32 = predictor.predict(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p16 = predictor.predict(image)
        dice["fp32"].append(image_metrics(p32, truth)["dice"])
        dice["bf16"].append(image_metrics(p16, truth)["dice"])
        max_diff = max(max_diff, float(np.abs(p32 - p16).max()))
        flipped += int(((p32 >= 0.5) != (p16 >= 0.5)).sum())
        pixels += p32.size
    m32, m16 = np.mean(dice["fp32"]), np.mean(dice["bf16"])
    print(f"{run}: {len(samples)} validation images")
    print(f"mean Dice fp32 {m32:.4f}, bf16 autocast {m16:.4f}, difference {m16 - m32:+.4f}")
    print(f"max |p_fp32 - p_bf16| {max_diff:.4f}; mask pixels that flip: {flipped} of {pixels} ({flipped / pixels:.2e})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a trained run folder")
    ap.add_argument("data", help="its dataset folder (the run's validation images are scored)")
    main(**vars(ap.parse_args()))
