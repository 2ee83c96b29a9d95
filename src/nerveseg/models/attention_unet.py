"""Attention U-Net: a U-Net whose skip features pass through additive attention gates."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .registry import register_model
from .unet import UNet


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al., MIDL 2018, Eq. 1-2 and Fig. 2).

        q = ReLU(BN(W_x x) + BN(W_g g)),  alpha = sigmoid(BN(psi q)),  output = alpha * x

    W_x, W_g and psi are 1x1 convolutions without bias; the BatchNorm shifts play the role of
    the biases b_g and b_psi (the common 2-D reference -- LeeJunHyun's ``Attention_block``, MONAI's
    ``AttentionBlock`` -- has conv bias *and* BN, the bias being redundant before BN).

    Args:
        skip_channels: channels F_l of the skip feature x.
        gate_channels: channels F_g of the gating signal g.
        inter_channels: channels F_int of the intermediate map q.

    Shapes: x (B, skip_channels, H, W), g (B, gate_channels, H, W) -> (B, skip_channels, H, W);
    ``attention`` gives alpha, (B, 1, H, W) in (0, 1).
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.w_x = nn.Sequential(nn.Conv2d(skip_channels, inter_channels, 1, bias=False), nn.BatchNorm2d(inter_channels))
        self.w_g = nn.Sequential(nn.Conv2d(gate_channels, inter_channels, 1, bias=False), nn.BatchNorm2d(inter_channels))
        self.psi = nn.Sequential(nn.Conv2d(inter_channels, 1, 1, bias=False), nn.BatchNorm2d(1))
        self.relu = nn.ReLU(inplace=True)

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The attention coefficients alpha, one per pixel, shape (B, 1, H, W)."""
        if x.shape[-2:] != g.shape[-2:]:
            raise ValueError(f"skip {tuple(x.shape)} and gate {tuple(g.shape)} differ in size")
        return torch.sigmoid(self.psi(self.relu(self.w_x(x) + self.w_g(g))))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x, g)


@register_model("attention_unet")
class AttentionUNet(UNet):
    """Attention U-Net (Oktay, Schlemper, Le Folgoc et al., "Attention U-Net: Learning Where to
    Look for the Pancreas", MIDL 2018), in 2-D.

    The ``unet`` baseline (two 3x3 conv + BN + ReLU per level, 2x2 max-pool down, 2x2 transposed
    convolution up, widths 32-512) with an ``AttentionGate`` on each skip. At each decoder
    level the coarser decoder feature is up-convolved (2x2 stride-2 transposed convolution) to the
    skip's resolution and width; that up-convolved feature is the gating signal g, the gated
    skip alpha * x is concatenated with it, and two 3x3 convs follow. F_int = skip channels / 2.

    Deviations from the paper: the gate works at the skip's resolution with g taken after the
    up-convolution (as in the widely used 2-D references, LeeJunHyun's ``AttU_Net`` and MONAI's
    ``AttentionUnet``); the paper computes it on the coarse grid -- W_x a stride-2 convolution of
    the skip, g the coarser feature as is -- and upsamples alpha trilinearly. BN after W_x, W_g
    and psi as in those references (the paper has biases, no BN, in the gate). No deep
    supervision, no separate gating-signal convolution on the bottleneck, 2-D instead of 3-D.

    At defaults: 7,850,713 parameters (``unet``'s 7,762,465 plus 88,248 in the four gates).

    Args:
        in_channels: image channels.
        out_channels: logit channels.
        features: widths of the levels, shallow to deep.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W) logits, any H, W.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
    ):
        super().__init__(in_channels, out_channels, features)  # U-Net's levels and up-convolutions
        # one gate per decoder level, deep to shallow like ``self.decoder``
        self.gates = nn.ModuleList(
            AttentionGate(width, width, max(1, width // 2)) for width in tuple(features)[-2::-1]
        )

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = self.encode(x)
        for up_conv, gate, level in zip(self.up_convs, self.gates, self.decoder):
            g = up_conv(x)
            x = level(torch.cat([gate(skips.pop(), g), g], dim=1))
        return self.head(x)
