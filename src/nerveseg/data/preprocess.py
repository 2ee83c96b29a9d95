"""Image <-> network input: aspect-preserving resize ("letterbox"), padding and standardisation.

The same functions serve training and inference, so a model always sees what it was trained
on, and every prediction is mapped back to the original pixel grid before it is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Letterbox:
    """Where an image went inside the square network input."""

    original_shape: tuple[int, int]  # (H, W) of the source image
    resized_shape: tuple[int, int]  # (h, w) of the scaled image in the top-left corner
    size: int  # side of the square input

    @property
    def scale(self) -> float:
        return self.resized_shape[0] / self.original_shape[0]


def letterbox_shape(shape: tuple[int, int], size: int) -> tuple[int, int]:
    h, w = shape
    scale = size / max(h, w)
    return max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))


def _resize(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (B, C, H, W) float tensor; antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(shape):
        return x
    shrinking = shape[0] < x.shape[-2] or shape[1] < x.shape[-1]
    return F.interpolate(x, size=shape, mode="bilinear", align_corners=False, antialias=shrinking)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Scale a (H, W) float image to fit ``size`` x ``size``, pad with 0 at bottom/right."""
    box = Letterbox(tuple(image.shape[:2]), letterbox_shape(image.shape[:2], size), size)
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    resized = _resize(t, box.resized_shape)[0, 0].numpy()
    out = np.zeros((size, size), dtype=np.float32)
    out[: box.resized_shape[0], : box.resized_shape[1]] = resized
    return out, box


def letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Letterbox a boolean mask the same way (area-weighted resize, then >= 0.5)."""
    resized, _ = letterbox(mask.astype(np.float32), size)
    return resized >= 0.5


def image_stats(image: np.ndarray) -> tuple[float, float]:
    """Mean and SD of an (unpadded) image; SD floored so a blank frame does not divide by 0."""
    return float(image.mean()), max(float(image.std()), 1e-3)


def standardize(x: np.ndarray | torch.Tensor, mean: float, sd: float):
    return (x - mean) / sd


def to_network_input(image: np.ndarray, size: int) -> tuple[torch.Tensor, Letterbox]:
    """(H, W) float image in [0, 1] -> standardised (1, 1, size, size) tensor and its box."""
    mean, sd = image_stats(image)
    boxed, box = letterbox(image, size)
    return torch.from_numpy(standardize(boxed, mean, sd))[None, None], box


def from_network_output(prob: torch.Tensor, box: Letterbox) -> np.ndarray:
    """(size, size) or (1, 1, size, size) probabilities -> (H, W) on the original grid;
    (C, size, size) with C > 1 -> (C, H, W)."""
    channels = prob.numel() // (box.size * box.size)
    prob = prob.reshape(1, channels, box.size, box.size).float()
    h, w = box.resized_shape
    cropped = prob[..., :h, :w]
    out = _resize(cropped, box.original_shape)[0].clamp_(0, 1).cpu().numpy()
    return out[0] if channels == 1 else out


def mirror_content(x: torch.Tensor, boxes) -> torch.Tensor:
    """Mirror left-right the image part of each letterboxed (B, C, S, S) tensor, leaving the
    padding where it is (bottom/right), so the mirrored input looks like a training input and
    applying this twice is the identity (flip test-time augmentation)."""
    out = x.clone()
    for i, box in enumerate(boxes):
        h, w = box.resized_shape
        out[i, :, :h, :w] = x[i, :, :h, :w].flip(-1)
    return out
