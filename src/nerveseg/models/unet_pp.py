"""U-Net++: a U-Net whose skips are nested, densely connected convolution pathways."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import SegmentationModel
from .blocks import DoubleConv
from .registry import register_model


@register_model("unet_pp")
class UNetPlusPlus(SegmentationModel):
    """U-Net++ (Zhou, Rahman Siddiquee, Tajbakhsh & Liang, "UNet++: A Nested U-Net Architecture
    for Medical Image Segmentation", DLMIA 2018, Fig. 1).

    Nodes X^{i,j}: i is the level (resolution 1/2^i), j the position along the skip pathway.
    X^{i,0} is the encoder: ``DoubleConv`` after a 2x2 max-pool. For j >= 1

        X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})])

    with H two 3x3 conv + BN + ReLU (``DoubleConv``) of width ``features[i]`` and Up a 2x2
    stride-2 transposed convolution ``features[i+1] -> features[i]`` (one per node, as in the
    authors' Keras ``Nest_Net``). A 1x1 convolution on X^{0,L-1} gives the logits.

    Deviations from the authors' Keras reference (``Nest_Net``, 9,041,601 parameters at these
    widths): BatchNorm after each 3x3 convolution, which then carries no bias (their
    ``standard_unit`` is conv + ELU + Dropout(0.5), with an L2 weight penalty 1e-4); ReLU instead
    of ELU; no dropout. BN's scale and shift (2 per channel) replace the conv bias (1 per
    channel): 3,648 more parameters over the 3,648 channels of the 3x3 convolutions, hence
    9,045,249 at defaults (exactly; 9,045,348 with ``deep_supervision``: three more 1x1 heads).

    Deep supervision: the paper attaches a 1x1 head to each of X^{0,1}..X^{0,L-1}, trains with
    one loss per head and, in its "accurate mode", averages the heads' outputs at inference.
    Here ``forward`` always returns a single logit map: with ``deep_supervision=True`` the mean
    of the heads' logits (in training and in evaluation alike), so losses and metrics see one
    map. ``head_logits`` gives the per-head logits if a per-head loss is wanted.

    Args:
        in_channels: image channels.
        out_channels: logit channels.
        features: widths of the levels, shallow to deep (L = len(features) >= 2 levels).
        deep_supervision: build a head on every X^{0,j}, j >= 1, and average their logits.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W) logits, any H, W.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        deep_supervision: bool = False,
    ):
        super().__init__()
        features = tuple(features)
        if len(features) < 2:
            raise ValueError(f"U-Net++ needs at least 2 levels, got features={features}")
        depth = len(features)
        self.depth = depth
        self.deep_supervision = deep_supervision
        self.size_divisor = 2 ** (depth - 1)
        self.pool = nn.MaxPool2d(2)
        # nodes["i_j"] is H of X^{i,j}; ups["i_j"] the up-convolution feeding it (j >= 1)
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for i, width in enumerate(features):
            self.nodes[f"{i}_0"] = DoubleConv(in_channels if i == 0 else features[i - 1], width)
        for j in range(1, depth):
            for i in range(depth - j):
                self.ups[f"{i}_{j}"] = nn.ConvTranspose2d(features[i + 1], features[i], kernel_size=2, stride=2)
                self.nodes[f"{i}_{j}"] = DoubleConv((j + 1) * features[i], features[i])
        head_columns = range(1, depth) if deep_supervision else [depth - 1]
        self.heads = nn.ModuleDict({str(j): nn.Conv2d(features[0], out_channels, kernel_size=1) for j in head_columns})

    def head_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head, shallow (X^{0,1}) to deep (X^{0,L-1}); one entry unless
        ``deep_supervision``. ``x`` must have sides divisible by ``size_divisor``."""
        grid: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(self.depth):
            x = self.nodes[f"{i}_0"](x if i == 0 else self.pool(x))
            grid[i, 0] = x
        for j in range(1, self.depth):
            for i in range(self.depth - j):
                up = self.ups[f"{i}_{j}"](grid[i + 1, j - 1])
                grid[i, j] = self.nodes[f"{i}_{j}"](torch.cat([*(grid[i, k] for k in range(j)), up], dim=1))
        return [head(grid[0, int(j)]) for j, head in self.heads.items()]

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head_logits(x)
        if len(logits) == 1:
            return logits[0]
        return torch.stack(logits).mean(dim=0)
