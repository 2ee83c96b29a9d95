"""Overlays for people: prediction in red, ground truth in green (the paper's Fig. 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..io_utils import atomic_path

RED = (255, 40, 40)
GREEN = (40, 220, 40)
# outlines of the model's other classes (vessels first), distinct from truth green and nerve red
CLASS_COLOURS = ((40, 160, 255), (255, 200, 0), (220, 80, 255))


def _outline(mask: np.ndarray, thickness: int) -> np.ndarray:
    if not mask.any():
        return mask
    inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask & ~inner


def make_overlay(
    image: np.ndarray,
    prediction: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    others: list[np.ndarray] | None = None,
) -> np.ndarray:
    """RGB uint8 picture of a (H, W) [0, 1] image with contours and a light fill of the prediction;
    ``others``: masks of the model's other classes (vessels), outlined in ``CLASS_COLOURS``."""
    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    thickness = max(1, round(max(image.shape) / 300))
    if prediction is not None and prediction.any():
        rgb[prediction] = 0.75 * rgb[prediction] + 0.25 * np.array(RED)
    for mask, colour in zip(others or [], CLASS_COLOURS):
        rgb[_outline(mask, thickness)] = colour
    if truth is not None:
        rgb[_outline(truth, thickness)] = GREEN
    if prediction is not None:
        rgb[_outline(prediction, thickness)] = RED
    return rgb.astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
