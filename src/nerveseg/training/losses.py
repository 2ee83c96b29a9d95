"""The paper's loss: soft Dice, L = 1 - DSC with DSC = 2 sum(p q) / (sum p + sum q)."""

from __future__ import annotations

import torch


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over images of 1 - (2 sum(p q) + s) / (sum p + sum q + s), p = sigmoid(logits).

    Computed per image (the paper defines DSC per image) and in float32 even under autocast.
    ``smooth`` (s = 1 pixel) keeps an empty mask from giving 0/0: an empty prediction on an empty
    mask has loss 0.
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    q = target.float().flatten(1)
    intersection = (p * q).sum(1)
    dice = (2 * intersection + smooth) / (p.sum(1) + q.sum(1) + smooth)
    return 1 - dice.mean()
