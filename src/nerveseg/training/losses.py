"""Losses. The paper's: soft Dice, L = 1 - DSC with DSC = 2 sum(p q) / (sum p + sum q).

Multi-class networks here have one sigmoid per class (not a softmax): the nerve channel keeps
its single-class meaning (P(nerve), thresholded at 0.5, the same loss as the paper's), and a
class can be trained even where labels could overlap. ``dice_ce`` adds binary cross-entropy per
class, nnU-Net's default pairing of a region loss with a pixel loss.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over images and classes of 1 - (2 sum(p q) + s) / (sum p + sum q + s), p = sigmoid(logits).

    Computed per image and per channel (the paper defines DSC per image) and in float32 even
    under autocast. ``smooth`` (s = 1 pixel) keeps an empty mask from giving 0/0: an empty
    prediction on an empty mask has loss 0. With one channel this is exactly the paper's loss.
    """
    p = torch.sigmoid(logits.float()).flatten(2)
    q = target.float().flatten(2)
    intersection = (p * q).sum(2)
    dice = (2 * intersection + smooth) / (p.sum(2) + q.sum(2) + smooth)
    return 1 - dice.mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice plus mean binary cross-entropy (per pixel and class), equally weighted."""
    return soft_dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits.float(), target.float())


LOSS_FUNCTIONS = {"dice": soft_dice_loss, "dice_ce": dice_ce_loss}


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights for the main output and ``n - 1`` auxiliary ones: 1, 1/2, 1/4, ...
    normalised to sum to 1."""
    w = [0.5**k for k in range(n)]
    return [v / sum(w) for v in w]


def supervised_loss(name: str, output, target: torch.Tensor) -> torch.Tensor:
    """The loss ``name`` on a network output: logits, or (logits, [aux...]) under deep supervision,
    where each auxiliary output is scored against the target shrunk to its size (area average,
    re-binarised at 0.5, so a thin structure is not lost to nearest-neighbour sampling)."""
    loss_fn = LOSS_FUNCTIONS[name]
    if not isinstance(output, tuple):
        return loss_fn(output, target)
    main, aux = output
    outputs: Sequence[torch.Tensor] = [main, *aux]
    weights = deep_supervision_weights(len(outputs))
    total = weights[0] * loss_fn(main, target)
    for w, out in zip(weights[1:], aux):
        small = (F.adaptive_avg_pool2d(target.float(), out.shape[-2:]) >= 0.5).float()
        total = total + w * loss_fn(out, small)
    return total
