"""Decode a set of samples once into letterboxed tensors kept in memory for training.

usgra-seg's 204 frames at 512x512 are ~200 MB as float32: decoding and resizing them once
instead of every epoch makes a CPU epoch several times faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import InputError
from .io import check_mask_not_empty, read_image, read_mask
from .preprocess import image_stats, letterbox, letterbox_mask
from .samples import Sample


@dataclass
class TensorSet:
    """Letterboxed images in [0, 1] (N, 1, S, S), masks (N, 1, S, S), per-image mean/SD (N, 2)."""

    stems: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    stats: torch.Tensor

    def __len__(self) -> int:
        return len(self.stems)

    def to(self, device) -> "TensorSet":
        return TensorSet(self.stems, self.images.to(device), self.masks.to(device), self.stats.to(device))


def load_tensor_set(
    samples: Sequence[Sample],
    size: int,
    label: int | None,
    allow_empty: bool = False,
) -> tuple[TensorSet, list[InputError]]:
    """Read, check and letterbox every sample; a bad pair is reported and left out."""
    stems, images, masks, stats, problems = [], [], [], [], []
    for sample in samples:
        try:
            image = read_image(sample.image_path)
            mask = read_mask(sample.mask_path, label=label, image_shape=image.shape)
            if not allow_empty:
                check_mask_not_empty(mask, sample.mask_path, label)
        except InputError as exc:
            problems.append(exc)
            continue
        boxed, _ = letterbox(image, size)
        stems.append(sample.stem)
        images.append(boxed)
        masks.append(letterbox_mask(mask, size))
        stats.append(image_stats(image))
    if not stems:
        empty = torch.zeros(0, 1, size, size)
        return TensorSet([], empty, empty.clone(), torch.zeros(0, 2)), problems
    return (
        TensorSet(
            stems,
            torch.from_numpy(np.stack(images))[:, None],
            torch.from_numpy(np.stack(masks).astype(np.float32))[:, None],
            torch.tensor(stats, dtype=torch.float32),
        ),
        problems,
    )
