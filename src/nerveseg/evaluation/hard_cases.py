"""Kinds of hard image, found from the image and its expert mask alone (never from a model's output),
so that a comparison's overlay panel (the paper's Fig. 4) shows every network on the same hard cases:

- ``bifid``: the expert outlined the nerve as two or more separate regions (a bifid or split median
  nerve), which a network trained mostly on one-region masks tends to merge or half-miss;
- ``low contrast``: the nerve barely differs from its surroundings. Contrast here is
  |mean(nerve) - mean(ring)| / SD(ring), the ring being the pixels within ``ring_px`` of the mask
  outside it: a signal-to-noise ratio of the boundary a reader has to see.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy import ndimage as ndi

from ..data.io import read_mask
from ..data.media import read_frame
from ..data.samples import Sample

# regions smaller than this are annotation specks, not a second fascicle group
MIN_REGION_PX = 50


def nerve_regions(mask: np.ndarray, min_px: int = MIN_REGION_PX) -> int:
    """Number of 8-connected regions of at least ``min_px`` pixels."""
    labels, _ = ndi.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel())[1:]  # pixels per region; label 0 is the background
    return int(np.count_nonzero(sizes >= min_px))


def boundary_contrast(image: np.ndarray, mask: np.ndarray, ring_px: int = 10) -> float:
    """|mean inside - mean of the ring| / SD of the ring, on the grey image; nan for an empty mask
    (or one that fills the frame, leaving no ring)."""
    grey = image.astype(np.float64)
    if grey.ndim == 3:
        grey = grey[..., :3].mean(axis=-1)
    mask = mask.astype(bool)
    ring = ndi.binary_dilation(mask, iterations=ring_px) & ~mask
    if not mask.any() or not ring.any():
        return math.nan
    spread = grey[ring].std()
    return float(abs(grey[mask].mean() - grey[ring].mean()) / max(spread, 1e-6))


def hard_case_stems(samples: Iterable[Sample], label: int | str | None = 1, low_contrast_fraction: float = 0.1,
                    ring_px: int = 10) -> dict[str, list[str]]:
    """{"bifid": stems whose mask has two or more regions, "low contrast": the ``low_contrast_fraction``
    of stems with the lowest boundary contrast (at least one), lowest first}. Images whose mask or
    frame cannot be read are left out (the benchmark has already reported them)."""
    bifid: list[str] = []
    contrasts: list[tuple[float, str]] = []
    for sample in samples:
        if sample.mask_path is None:
            continue
        try:
            image, _, _ = read_frame(sample.image_path, sample.frame)
            mask = read_mask(sample.mask_path, label=label, image_shape=image.shape)
        except Exception:  # noqa: BLE001 - a picture for a panel is never worth failing a benchmark over
            continue
        if nerve_regions(mask) >= 2:
            bifid.append(sample.stem)
        value = boundary_contrast(image, mask, ring_px)
        if math.isfinite(value):
            contrasts.append((value, sample.stem))
    contrasts.sort()
    n_low = max(1, math.ceil(low_contrast_fraction * len(contrasts))) if contrasts else 0
    return {"bifid": sorted(bifid), "low contrast": [stem for _, stem in contrasts[:n_low]]}
