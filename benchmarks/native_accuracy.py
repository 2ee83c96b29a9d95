"""Does the native fused SAConv path keep accuracy? Dice of one run's validation images through
PyTorch fp32, the standard ONNX graph and the native-operator graph (both on onnxruntime).

Usage: python benchmarks/native_accuracy.py RUN DATA
"""

from __future__ import annotations

import argparse

import numpy as np

from nerveseg.data import discover_samples, read_image, read_mask
from nerveseg.evaluation.evaluate import select_subset
from nerveseg.evaluation.metrics import image_metrics
from nerveseg.inference.onnx_backend import OnnxPredictor
from nerveseg.inference.predictor import Predictor


def main(run: str, data: str) -> None:
    paths = {
        "torch fp32": Predictor.from_run(run, device="cpu"),
        "onnxruntime standard graph": OnnxPredictor.from_run(run, device="cpu", native=False),
        "onnxruntime native SAConv": OnnxPredictor.from_run(run, device="cpu", native=True),
    }
    if not paths["onnxruntime native SAConv"].native_ops:
        raise SystemExit("the native SAConv library is not available here")
    reference = paths["torch fp32"]
    samples = select_subset(discover_samples(data)[0], reference, "val")
    dice = {name: [] for name in paths}
    worst = {name: 0.0 for name in paths}
    flipped = {name: 0 for name in paths}
    pixels = 0
    for sample in samples:
        image = read_image(sample.image_path)
        truth = read_mask(sample.mask_path, label=reference.config.data.label)
        probs = {name: p.predict(image) for name, p in paths.items()}
        for name, prob in probs.items():
            dice[name].append(image_metrics(prob, truth)["dice"])
            worst[name] = max(worst[name], float(np.abs(prob - probs["torch fp32"]).max()))
            flipped[name] += int(((prob >= 0.5) != (probs["torch fp32"] >= 0.5)).sum())
        pixels += image.size
    print(f"{run}: {len(samples)} validation images")
    for name in paths:
        print(f"  {name:<28} mean Dice {np.mean(dice[name]):.4f}  max |p - p_torch| {worst[name]:.1e}  "
              f"mask pixels that differ from torch: {flipped[name]} of {pixels}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a trained SA-UNet run folder")
    ap.add_argument("data", help="its dataset folder (the run's validation images are scored)")
    main(**vars(ap.parse_args()))
