"""Building blocks shared by the architectures: one concern per class.

``SAConv`` is the scale-attentional convolution of Kim et al. (2022), Fig. 2: a purely linear
cascade of factorized convolutions whose intermediate outputs (receptive fields 1, 3, 5, ...)
are concatenated and re-weighted by efficient channel attention (ECA, Wang et al. 2020).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["eca_kernel_size", "ECA", "SAConv", "ConvBNReLU", "DoubleConv"]


def eca_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """Kernel size of ECA's 1-D convolution for ``channels`` channels.

    ECA-Net (Wang et al., CVPR 2020, Eq. 12): k = |log2(C)/gamma + b/gamma|_odd, the odd number
    nearest to t, ties going up. That is exactly what ECA's reference code computes
    (``t = int(t); k = t if t % 2 else t + 1``): for t in [2m, 2m+2) both give 2m+1, except that
    the tie t = 2m goes up to 2m+1. We never go below 3 so the attention always mixes
    neighbouring channels (k = 1 would make it a per-channel gate).
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    t = int(abs(math.log2(channels) / gamma + b / gamma))
    k = t if t % 2 else t + 1
    return max(3, k)


class ECA(nn.Module):
    """Efficient channel attention: y = x * sigmoid(Conv1d_k(GAP(x))).

    Args:
        channels: number of input channels C (fixes the kernel size by ``eca_kernel_size``).
        kernel_size: override the kernel size rule.

    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, kernel_size: int | None = None):
        super().__init__()
        k = kernel_size if kernel_size is not None else eca_kernel_size(channels)
        if k % 2 != 1:
            raise ValueError(f"ECA kernel size must be odd, got {k}")
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=k // 2, bias=False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel weights G(z) in (0, 1), shape (B, C, 1, 1)."""
        pooled = x.mean(dim=(2, 3))  # (B, C): channel-wise global average pooling g(z)
        weights = self.conv(pooled.unsqueeze(1)).squeeze(1)  # 1-D conv across channels
        return torch.sigmoid(weights)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class SAConv(nn.Module):
    """Scale-attentional convolution (Kim et al., Ultrasonography 2022, Fig. 2).

    H1 is a 1x1 convolution ``in_channels -> out_channels / n``; H2..Hn are each a depthwise 3x3
    followed by a pointwise 1x1 at ``out_channels / n`` channels. They are applied in cascade with
    no normalisation or activation in between, so F_k = H_k o ... o H_1 is one linear
    convolution with a (2k-1) x (2k-1) receptive field. F_1..F_n are concatenated to
    ``out_channels`` channels, weighted by ECA, then batch-normalised and rectified.

    Args:
        in_channels: input channels.
        out_channels: output channels; must be divisible by ``n``.
        n: number of cascaded convolutions N (the paper's baseline uses 4).
        bias: whether the cascade convolutions carry a bias. The paper does not say; we keep
            biases (Keras' default) -- they are redundant before BatchNorm only up to ECA's
            nonlinear gate, so they are not strictly removable.
        norm: apply BatchNorm + ReLU after the attention (the paper's Fig. 2 does not show where
            normalisation sits; a conv layer in its U-Net is conv -> BN -> ReLU, so we put it at
            the output).

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, n: int = 4, bias: bool = True, norm: bool = True):
        super().__init__()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if out_channels % n != 0:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by n ({n})")
        width = out_channels // n
        self.n = n
        self.cascade = nn.ModuleList([nn.Conv2d(in_channels, width, kernel_size=1, bias=bias)])
        for _ in range(n - 1):
            self.cascade.append(
                nn.Sequential(
                    nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width, bias=bias),  # depthwise
                    nn.Conv2d(width, width, kernel_size=1, bias=bias),  # pointwise
                )
            )
        self.attention = ECA(out_channels)
        self.norm = nn.BatchNorm2d(out_channels) if norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if norm else nn.Identity()

    def scales(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The intermediate outputs F_1..F_n of the linear cascade (before attention)."""
        outputs = []
        for h in self.cascade:
            x = h(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat(self.scales(x), dim=1)
        return self.act(self.norm(self.attention(z)))


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias: BatchNorm follows) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two ``ConvBNReLU``: the classic U-Net level."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))
