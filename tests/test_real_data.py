"""The real usgra-seg images (skipped where ../shared/data is absent)."""

from __future__ import annotations

import numpy as np

from nerveseg.data import discover_samples, read_image, read_mask
from nerveseg.data.preprocess import from_network_output, to_network_input


def test_every_real_pair_reads_and_has_a_nerve(real_data):
    samples, problems = discover_samples(real_data)
    assert problems == [] and len(samples) == 204
    shapes = set()
    for sample in samples:
        image = read_image(sample.image_path)
        nerve = read_mask(sample.mask_path, label=1, image_shape=image.shape)
        anything = read_mask(sample.mask_path, image_shape=image.shape)
        assert image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
        assert nerve.any() and (anything.sum() >= nerve.sum())
        shapes.add(image.shape)
    assert shapes == {(512, 534), (512, 512), (632, 761)}


def test_letterbox_round_trip_on_real_frames(real_data):
    samples, _ = discover_samples(real_data)
    for sample in samples[:3]:
        image = read_image(sample.image_path)
        x, box = to_network_input(image, 256)
        assert x.shape == (1, 1, 256, 256)
        mask = read_mask(sample.mask_path, label=1).astype(np.float32)
        from nerveseg.data.preprocess import letterbox

        boxed, _ = letterbox(mask, 256)
        import torch

        back = from_network_output(torch.from_numpy(boxed), box) >= 0.5
        truth = mask > 0
        dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
        assert back.shape == truth.shape and dice > 0.9  # resampling loses only the boundary
