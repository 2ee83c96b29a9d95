"""SA-UNet: the U-Net of Ronneberger et al. with every convolution replaced by ``SAConv``."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .base import UNetSkeleton
from .blocks import SAConv
from .registry import register_model


class SALevel(nn.Sequential):
    """Two SAConvs: one U-Net level."""

    def __init__(self, in_channels: int, out_channels: int, n: int):
        super().__init__(SAConv(in_channels, out_channels, n), SAConv(out_channels, out_channels, n))


@register_model("sa_unet")
class SAUNet(UNetSkeleton):
    """Scale-attentional U-Net (Kim et al., Ultrasonography 2022;41:706-717, Fig. 1).

    Encoder: per level two SAConvs, then 2x2 max-pooling. Decoder: nearest-neighbour x2
    upsampling followed by an SAConv (the paper uses "nearest neighbor and convolution"
    instead of transposed convolution), concatenation with the skip, two SAConvs. A 1x1
    convolution gives one logit per pixel.

    Reconstruction choices the paper leaves open (see docs/ARCHITECTURE.md): widths
    32-64-128-256-512; BatchNorm + ReLU after ECA in every SAConv; the up-sampling SAConv halves
    the channels like U-Net's up-convolution. This gives 455,603 parameters (paper: 491K).

    Args:
        in_channels: image channels (1: ultrasound is grey).
        out_channels: logit channels (1: nerve vs background).
        deep_supervision: auxiliary 1x1 heads on the coarser decoder levels (training only).
        features: widths of the five levels.
        n: cascade length N of each SAConv.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W) logits, any H, W.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        n: int = 4,
        deep_supervision: bool = False,
    ):
        super().__init__(
            in_channels,
            out_channels,
            features,
            level=lambda cin, cout: SALevel(cin, cout, n),
            up=lambda deep, shallow: SAConv(deep, shallow, n),
            upsample=nn.Upsample(scale_factor=2, mode="nearest"),
            deep_supervision=deep_supervision,
        )
