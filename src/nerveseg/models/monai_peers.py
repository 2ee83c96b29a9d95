"""MONAI's own U-Net++ and Attention U-Net behind the nerveseg model contract.

They serve as independent implementations to compare ours against. MONAI is a test-only
dependency: it is imported when one of these models is built, never when nerveseg is imported,
so registering them costs nothing and a missing MONAI is reported by ``create``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import SegmentationModel
from .registry import register_model


def _monai_nets():
    try:
        from monai.networks import nets
    except ImportError as exc:
        raise ConfigError(f"this architecture needs MONAI: pip install monai ({exc})") from exc
    return nets


@register_model("monai_unet_pp")
class MonaiUNetPlusPlus(SegmentationModel):
    """MONAI's ``BasicUNetPlusPlus`` (U-Net++, Zhou et al., DLMIA 2018) in 2-D.

    MONAI's own defaults otherwise: instance norm (affine), LeakyReLU(0.1), conv biases, 2x2
    transposed convolutions (halving the channels, except towards level 0 where they keep f1),
    no dropout. Our five widths (f0, ..., f4) become MONAI's six as
    (f0, f1, f2, f3, f4, f0): the last is the width of X^{0,4}. Without deep supervision MONAI
    still builds the 1x1 heads on X^{0,1..3} and discards their outputs; they are replaced by
    ``nn.Identity`` here so that no parameter is left without a gradient (99 fewer parameters
    than MONAI's model at defaults).

    At defaults: 9,118,657 parameters.

    Args:
        in_channels: image channels.
        out_channels: logit channels.
        features: five level widths.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W) logits, any H, W.

    Raises:
        ConfigError: MONAI is not installed, or ``features`` is not five widths.
    """

    size_divisor = 16

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
    ):
        super().__init__()
        features = tuple(features)
        if len(features) != 5:
            raise ConfigError(f"monai_unet_pp needs five widths, got features={features}")
        nets = _monai_nets()
        self.net = nets.BasicUNetPlusPlus(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            features=(*features, features[0]),
            deep_supervision=False,
        )
        for name in ("final_conv_0_1", "final_conv_0_2", "final_conv_0_3"):
            setattr(self.net, name, nn.Identity())

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


@register_model("monai_attention_unet")
class MonaiAttentionUNet(SegmentationModel):
    """MONAI's ``AttentionUnet`` (Oktay et al., MIDL 2018) in 2-D.

    MONAI's design: two 3x3 conv + BN + ReLU per level, the first with stride 2 going down (no
    max-pool); 3x3 stride-2 transposed convolution + BN + ReLU going up; attention gates with
    F_int = skip channels / 2 gated by the up-convolved feature; then a single 3x3 convolution
    (MONAI's ``Convolution`` defaults: instance norm, PReLU) on [gated skip, up]; no dropout.

    At defaults: 7,939,745 parameters.

    Args:
        in_channels: image channels.
        out_channels: logit channels.
        features: level widths (MONAI's ``channels``); strides 2 between levels.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W) logits, any H, W.

    Raises:
        ConfigError: MONAI is not installed, or fewer than two widths.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
    ):
        super().__init__()
        features = tuple(features)
        if len(features) < 2:
            raise ConfigError(f"monai_attention_unet needs at least two widths, got features={features}")
        nets = _monai_nets()
        self.size_divisor = 2 ** (len(features) - 1)
        self.net = nets.AttentionUnet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=features,
            strides=(2,) * (len(features) - 1),
        )

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
