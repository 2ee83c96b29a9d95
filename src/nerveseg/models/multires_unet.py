"""MultiResUNet: U-Net with MultiRes blocks for the levels and residual paths for the skips."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import SegmentationModel
from .blocks import ConvBNReLU
from .registry import register_model


def multires_widths(u: int, alpha: float = 1.67) -> tuple[int, int, int]:
    """Filters of the three chained 3x3 convolutions of a MultiRes block for U = ``u``.

    W = alpha * U split as in the authors' code: int(0.167 W), int(0.333 W), int(0.5 W) -- the
    paper's W/6, W/3, W/2 with truncated fractions. The two agree for U = 32..256; for U = 512
    (W = 855.04) the middle one is 284 where int(W/3) would be 285.
    """
    w = alpha * u
    return int(w * 0.167), int(w * 0.333), int(w * 0.5)


class ConvBN(nn.Sequential):
    """Convolution (no bias: BatchNorm follows) -> BatchNorm, no activation: the shortcuts."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class MultiResBlock(nn.Module):
    """MultiRes block (Ibtehaz & Rahman 2020, Fig. 3c), in the order of the authors' Keras code.

        a = CBR3(x), b = CBR3(a), c = CBR3(b)          (CBR3: 3x3 conv -> BN -> ReLU)
        y = BN(ReLU(BN([a, b, c]) + BN(conv1x1(x))))

    The chain approximates 3x3, 5x5 and 7x7 receptive fields; the 1x1 shortcut maps the input to
    the concatenated width.

    Args:
        in_channels: input channels.
        u: the U-Net width U of this level; W = alpha * U.
        alpha: the width multiplier (1.67 in the paper).

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W), out_channels = sum of
    ``multires_widths(u, alpha)`` (51 for U = 32).
    """

    def __init__(self, in_channels: int, u: int, alpha: float = 1.67):
        super().__init__()
        widths = multires_widths(u, alpha)
        if min(widths) < 1:
            raise ValueError(f"U = {u} with alpha = {alpha} gives an empty convolution: widths {widths}")
        self.widths = widths
        self.out_channels = sum(widths)
        self.shortcut = ConvBN(in_channels, self.out_channels, kernel_size=1)
        self.convs = nn.ModuleList()
        prev = in_channels
        for width in widths:
            self.convs.append(ConvBNReLU(prev, width))
            prev = width
        self.concat_norm = nn.BatchNorm2d(self.out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.out_norm = nn.BatchNorm2d(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        outputs = []
        for conv in self.convs:
            x = conv(x)
            outputs.append(x)
        y = self.concat_norm(torch.cat(outputs, dim=1)) + shortcut
        return self.out_norm(self.relu(y))


class ResPath(nn.Sequential):
    """Res path (Ibtehaz & Rahman 2020, Fig. 4): ``length`` residual steps on a skip,

        y = BN(ReLU(CBR3(x) + BN(conv1x1(x)))),

    the first mapping ``in_channels`` to ``out_channels`` (the authors' code gives the path U
    filters, not the MultiRes block's width).

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, length: int):
        if length < 1:
            raise ValueError(f"a Res path needs length >= 1, got {length}")
        super().__init__(*(ResPathStep(in_channels if k == 0 else out_channels, out_channels) for k in range(length)))


class ResPathStep(nn.Module):
    """One step of a Res path: BN(ReLU(CBR3(x) + BN(conv1x1(x))))."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels)
        self.shortcut = ConvBN(in_channels, out_channels, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.relu(self.conv(x) + self.shortcut(x)))


@register_model("multires_unet")
class MultiResUNet(SegmentationModel):
    """MultiResUNet (Ibtehaz & Rahman, "MultiResUNet: Rethinking the U-Net architecture for
    multimodal biomedical image segmentation", Neural Networks 121:74-87, 2020, Fig. 5).

    Level i (U = ``features[i]``): encoder MultiRes block, 2x2 max-pool; its output reaches the
    decoder through a Res path of length L-1-i (4, 3, 2, 1 for five levels) with U filters. Decoder:
    2x2 stride-2 transposed convolution to U filters (with bias), concatenated with the Res path
    output ([up, skip] as in the authors' code), MultiRes block. A 1x1 convolution gives the
    logits.

    Follows the authors' Keras ``MultiResUnet`` (tensorflow/MultiResUNet.py), with these
    deviations: every BatchNorm has a learnt scale (their ``conv2d_bn`` uses ``scale=False``,
    i.e. a shift only); PyTorch's BN defaults (eps 1e-5, momentum 0.1) instead of Keras' (1e-3,
    0.99); the head is a 1x1 convolution with bias giving logits, where theirs is a bias-free 1x1
    convolution + BN (shift only) + sigmoid -- the same 52 trainable parameters at U = 32.

    At defaults: 7,244,528 parameters. The authors' Keras model at the same widths (one input
    channel) has 7,237,982 trainable parameters (counted layer by layer; 7,262,504 in all with
    BN's moving statistics, which Keras lists as non-trainable). The difference, 6,546, is the
    learnt BN scale, one per channel of the 56 ``conv2d_bn`` layers (6,546 channels).

    Args:
        in_channels: image channels.
        out_channels: logit channels.
        features: the U-Net widths U of the levels, shallow to deep (W = alpha * U per block).
        alpha: MultiRes width multiplier.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W) logits, any H, W.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        alpha: float = 1.67,
    ):
        super().__init__()
        features = tuple(features)
        if len(features) < 2:
            raise ValueError(f"MultiResUNet needs at least 2 levels, got features={features}")
        depth = len(features)
        self.size_divisor = 2 ** (depth - 1)
        self.pool = nn.MaxPool2d(2)
        self.encoder = nn.ModuleList()
        self.res_paths = nn.ModuleList()
        prev = in_channels
        for i, u in enumerate(features):
            block = MultiResBlock(prev, u, alpha)
            self.encoder.append(block)
            if i < depth - 1:
                self.res_paths.append(ResPath(block.out_channels, u, length=depth - 1 - i))
            prev = block.out_channels
        self.up_convs = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for u in features[-2::-1]:
            self.up_convs.append(nn.ConvTranspose2d(prev, u, kernel_size=2, stride=2))
            block = MultiResBlock(2 * u, u, alpha)
            self.decoder.append(block)
            prev = block.out_channels
        self.head = nn.Conv2d(prev, out_channels, kernel_size=1)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = self.pool(x)
            x = block(x)
            if i < len(self.res_paths):
                skips.append(self.res_paths[i](x))
        for up_conv, block in zip(self.up_convs, self.decoder):
            x = block(torch.cat([up_conv(x), skips.pop()], dim=1))
        return self.head(x)
