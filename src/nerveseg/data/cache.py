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
from .io import check_mask_not_empty, read_mask
from .media import read_frame
from .preprocess import image_stats, letterbox, letterbox_mask
from .samples import Sample


@dataclass
class TensorSet:
    """Letterboxed images in [0, 1] (N, 1, S, S), masks (N, C, S, S) (one channel per class),
    per-image mean/SD (N, 2)."""

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
    label: int | str | None | Sequence[int | str],
    allow_empty: bool = False,
) -> tuple[TensorSet, list[InputError]]:
    """Read, check and letterbox every sample; a bad pair is reported and left out.

    ``label`` is one label, or a list of them for a multi-class set (one mask channel each).
    Only the first (primary) class must be present in a training pair: a frame without a vessel
    in view is a valid example of "no vessel".
    """
    labels = list(label) if isinstance(label, (list, tuple)) else [label]
    stems, images, masks, stats, problems = [], [], [], [], []
    for sample in samples:
        try:
            image = read_frame(sample.image_path, sample.frame)[0]  # a still, a DICOM or a cine frame
            channels = [read_mask(sample.mask_path, label=lab, image_shape=image.shape) for lab in labels]
            if not allow_empty:
                check_mask_not_empty(channels[0], sample.mask_path, labels[0])
        except InputError as exc:
            problems.append(exc)
            continue
        boxed, _ = letterbox(image, size)
        stems.append(sample.stem)
        images.append(boxed)
        masks.append(np.stack([letterbox_mask(m, size) for m in channels]))
        stats.append(image_stats(image))
    if not stems:
        return TensorSet([], torch.zeros(0, 1, size, size), torch.zeros(0, len(labels), size, size), torch.zeros(0, 2)), problems
    return (
        TensorSet(
            stems,
            torch.from_numpy(np.stack(images))[:, None],
            torch.from_numpy(np.stack(masks).astype(np.float32)),
            torch.tensor(stats, dtype=torch.float32),
        ),
        problems,
    )
