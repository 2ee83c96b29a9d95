"""Batched, on-the-fly augmentation in torch (fast on CPU; no extra dependency).

The paper's only augmentation is a random shear between -15 and 15 degrees along x and y,
drawn independently; everything else is opt-in.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def _affine(images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # zeros outside = black, the same padding the letterbox uses
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return images, (masks >= 0.5).to(masks.dtype)


def augment_batch(
    images: torch.Tensor,
    masks: torch.Tensor,
    augmentations: Sequence[str],
    shear_degrees: float = 15.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment (B, 1, H, W) images in [0, 1] (before standardisation) and binary masks.

    ``shear``: x' = x + tan(a) y, y' = y + tan(b) x with a, b ~ U(-shear, shear) degrees.
    ``scale``: isotropic zoom 0.85-1.15. ``hflip``/``vflip``: mirror with p = 0.5.
    ``gamma``: x ** g, g ~ U(0.7, 1.5). ``contrast``: x * c + d, c ~ U(0.75, 1.25),
    d ~ U(-0.1, 0.1), clipped to [0, 1]. ``speckle``: multiplicative Gaussian noise x (1 + 0.1 n).
    """
    b = images.shape[0]
    dev = images.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=generator).to(dev) * (hi - lo) + lo

    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    geometric = False
    if "shear" in augmentations and shear_degrees > 0:
        theta[:, 0, 1] = torch.tan(uniform(-shear_degrees, shear_degrees) * math.pi / 180)
        theta[:, 1, 0] = torch.tan(uniform(-shear_degrees, shear_degrees) * math.pi / 180)
        geometric = True
    if "scale" in augmentations:
        theta[:, :, :2] = theta[:, :, :2] / uniform(0.85, 1.15)[:, None, None]
        geometric = True
    if geometric:
        images, masks = _affine(images, masks, theta)
    for flag, dim in (("hflip", 3), ("vflip", 2)):
        if flag in augmentations:
            flip = torch.rand(b, generator=generator).to(dev) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(dim), images)
            masks = torch.where(flip[:, None, None, None], masks.flip(dim), masks)
    if "gamma" in augmentations:
        images = images.clamp(0, 1) ** uniform(0.7, 1.5)[:, None, None, None]
    if "contrast" in augmentations:
        images = (images * uniform(0.75, 1.25)[:, None, None, None] + uniform(-0.1, 0.1)[:, None, None, None]).clamp(0, 1)
    if "speckle" in augmentations:
        noise = torch.randn(images.shape, generator=generator).to(dev)
        images = (images * (1 + 0.1 * noise)).clamp(0, 1)
    return images, masks
