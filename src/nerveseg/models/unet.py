"""The classic U-Net baseline (Ronneberger et al., MICCAI 2015) with BatchNorm."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .base import UNetSkeleton
from .blocks import DoubleConv
from .registry import register_model


@register_model("unet")
class UNet(UNetSkeleton):
    """U-Net: two 3x3 conv + BN + ReLU per level, 2x2 max-pool down, 2x2 transposed conv up.

    Args:
        in_channels: image channels.
        out_channels: logit channels.
        deep_supervision: auxiliary 1x1 heads on the coarser decoder levels (training only).
        features: widths of the five levels (32-512 gives 7,762,465 parameters).

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W) logits, any H, W.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        deep_supervision: bool = False,
    ):
        super().__init__(
            in_channels,
            out_channels,
            features,
            level=DoubleConv,
            up=lambda deep, shallow: nn.ConvTranspose2d(deep, shallow, kernel_size=2, stride=2),
            deep_supervision=deep_supervision,
        )
