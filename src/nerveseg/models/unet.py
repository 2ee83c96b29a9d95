"""The classic U-Net baseline (Ronneberger et al., MICCAI 2015) with BatchNorm."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import SegmentationModel
from .blocks import DoubleConv
from .registry import register_model


@register_model("unet")
class UNet(SegmentationModel):
    """U-Net: two 3x3 conv + BN + ReLU per level, 2x2 max-pool down, 2x2 transposed conv up.

    Args:
        in_channels: image channels.
        out_channels: logit channels.
        features: widths of the five levels (32-512 gives 7,762,465 parameters).

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W) logits, any H, W.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
    ):
        super().__init__()
        features = tuple(features)
        self.size_divisor = 2 ** (len(features) - 1)
        self.encoder = nn.ModuleList()
        prev = in_channels
        for width in features:
            self.encoder.append(DoubleConv(prev, width))
            prev = width
        self.pool = nn.MaxPool2d(2)
        self.up_convs = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for deep, shallow in zip(features[:0:-1], features[-2::-1]):
            self.up_convs.append(nn.ConvTranspose2d(deep, shallow, kernel_size=2, stride=2))
            self.decoder.append(DoubleConv(2 * shallow, shallow))
        self.head = nn.Conv2d(features[0], out_channels, kernel_size=1)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, level in enumerate(self.encoder):
            if i:
                x = self.pool(x)
            x = level(x)
            skips.append(x)
        skips.pop()
        for up_conv, level in zip(self.up_convs, self.decoder):
            x = up_conv(x)
            x = level(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)
