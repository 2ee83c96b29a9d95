"""Batched, on-the-fly augmentation in torch (fast on CPU; no extra dependency).

The paper's only augmentation is a random shear between -15 and 15 degrees along x and y,
drawn independently; everything else is opt-in. The nnU-Net kind (Isensee et al., Nat. Methods
2021: rotation, scaling, elastic deformation, brightness, contrast, gamma, Gaussian noise and
blur, simulated low resolution) is here with nnU-Net's per-sample probabilities, and magnitudes
cut down for ultrasound: the depth axis has a meaning (skin at the top), so rotations stay within
+-15 degrees instead of nnU-Net's +-180.

Every geometric transform moves image and masks through one shared sampling grid, so they stay
aligned; random numbers come from the CPU ``generator`` in a fixed order, and an augmentation
that is not enabled draws nothing, so adding one to the code never changes another recipe's
batches.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# per-sample probabilities of the nnU-Net-kind transforms (nnU-Net v2's defaults where it has them)
P_ROTATE, P_ELASTIC, P_BRIGHTNESS, P_NOISE, P_BLUR, P_LOWRES = 0.5, 0.3, 0.15, 0.15, 0.2, 0.25
ROTATE_DEGREES = 15.0
ELASTIC_AMPLITUDE = 0.04  # displacement SD in normalised coordinates (a fraction of half the side)
ELASTIC_GRID = 5  # control points per side of the smooth displacement field


def _affine(
    images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor, displacement: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if displacement is not None:
        grid = grid + displacement
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

    nnU-Net kind, each applied to a sample with its probability ``P_*``: ``rotate`` (+-15 degrees),
    ``elastic`` (a smooth random displacement field, bilinear from a 5x5 grid), ``brightness``
    (x * U(0.75, 1.25)), ``noise`` (additive Gaussian, SD ~ U(0, 0.05)), ``blur`` (Gaussian, sigma
    ~ U(0.5, 1.0) px), ``lowres`` (down to U(0.5, 1) of the side, nearest, and back up, bilinear).

    ``masks`` may have several channels (one per class); each is resampled like the image and
    re-binarised at 0.5.
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
    if "rotate" in augmentations:
        angle = uniform(-ROTATE_DEGREES, ROTATE_DEGREES) * math.pi / 180
        angle = torch.where(torch.rand(b, generator=generator).to(dev) < P_ROTATE, angle, torch.zeros_like(angle))
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        theta[:, :, :2] = theta[:, :, :2] @ rotation
        geometric = True
    displacement = None
    if "elastic" in augmentations:
        coarse = torch.randn(b, 2, ELASTIC_GRID, ELASTIC_GRID, generator=generator).to(dev) * ELASTIC_AMPLITUDE
        coarse = coarse * (torch.rand(b, generator=generator).to(dev) < P_ELASTIC)[:, None, None, None]
        field = F.interpolate(coarse, size=images.shape[-2:], mode="bicubic", align_corners=True)
        displacement = field.permute(0, 2, 3, 1)
        geometric = True
    if geometric:
        images, masks = _affine(images, masks, theta, displacement)
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

    def chosen(p: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator).to(dev) < p)[:, None, None, None]

    if "brightness" in augmentations:
        factor = uniform(0.75, 1.25)[:, None, None, None]
        images = torch.where(chosen(P_BRIGHTNESS), (images * factor).clamp(0, 1), images)
    if "noise" in augmentations:
        sd = uniform(0.0, 0.05)[:, None, None, None]
        noise = torch.randn(images.shape, generator=generator).to(dev)
        images = torch.where(chosen(P_NOISE), (images + sd * noise).clamp(0, 1), images)
    if "blur" in augmentations:
        sigmas, pick = uniform(0.5, 1.0), chosen(P_BLUR)[:, 0, 0, 0]
        images = torch.stack([gaussian_blur(img, float(s)) if on else img for img, s, on in zip(images, sigmas, pick)])
    if "lowres" in augmentations:
        zooms, pick = uniform(0.5, 1.0), chosen(P_LOWRES)[:, 0, 0, 0]
        images = torch.stack([simulate_low_resolution(img, float(z)) if on else img for img, z, on in zip(images, zooms, pick)])
    return images, masks


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (C, H, W) image (kernel radius 3 sigma, reflect padding)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


def simulate_low_resolution(image: torch.Tensor, zoom: float) -> torch.Tensor:
    """nnU-Net's SimulateLowResolution: nearest down-sampling to ``zoom`` of each side, bilinear back up."""
    h, w = image.shape[-2:]
    small = F.interpolate(image[None], size=(max(1, round(h * zoom)), max(1, round(w * zoom))), mode="nearest")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
