"""The model contract: (B, 1, H, W) in, logits (B, 1, H, W) out, for any H and W."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def replace_modules_(model: nn.Module, matches: Callable[[nn.Module], bool], replacement: Callable[[nn.Module], nn.Module]) -> int:
    """Replace, in place, every submodule of ``model`` for which ``matches`` holds by
    ``replacement(submodule)``; returns how many. (Export and inference rewrite blocks this way.)"""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if matches(child):
                setattr(parent, name, replacement(child))
                replaced += 1
    return replaced


class SegmentationModel(nn.Module):
    """Base class of every nerveseg network.

    Encoder-decoder networks with ``depth`` 2x poolings need sides divisible by ``2**depth``.
    Rather than refuse the 442x565 or 534x512 frames ultrasound machines produce, ``forward``
    pads the input on the bottom/right with zeros to the next multiple and crops the logits
    back, so the output always has the input's size.

    Subclasses implement ``forward_padded`` on inputs whose sides are multiples of
    ``size_divisor``. ``forward`` returns raw logits; ``predict`` returns probabilities.

    Deep supervision (networks built with ``deep_supervision=True``): in training mode
    ``forward`` returns ``(logits, [aux_1, aux_2, ...])``, the auxiliary logits at 1/2, 1/4, ...
    of the input's resolution; in eval mode only the logits, so inference, export and every
    metric see the plain network.
    """

    size_divisor: int = 16

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        d = self.size_divisor
        pad_h, pad_w = (-h) % d, (-w) % d
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = self.forward_padded(x)
        if isinstance(logits, tuple):  # deep supervision, training mode
            main, aux = logits
            return main[..., :h, :w], [a[..., : -(-h // 2 ** (k + 1)), : -(-w // 2 ** (k + 1))] for k, a in enumerate(aux)]
        if pad_h or pad_w:
            logits = logits[..., :h, :w]
        return logits

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities in [0, 1] in eval mode."""
        self.eval()
        return torch.sigmoid(self(x))


class UNetSkeleton(SegmentationModel):
    """The U-Net topology shared by U-Net variants, parameterised by its blocks.

    ``level(in, out)`` builds one encoder/decoder level; ``up(deep, shallow)`` maps the deeper
    decoder feature to the skip's width at twice the resolution (after ``upsample`` when given).
    Encoder: level, then 2x2 max-pool before each deeper level. Decoder: up, concatenate with the
    skip, level. Head: 1x1 convolution to ``out_channels`` logits. ``deep_supervision`` adds a
    1x1 head on every decoder level but the last (nnU-Net's auxiliary outputs), used in training only.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        features: Sequence[int],
        level: Callable[[int, int], nn.Module],
        up: Callable[[int, int], nn.Module],
        upsample: nn.Module | None = None,
        deep_supervision: bool = False,
    ):
        super().__init__()
        features = tuple(features)
        self.size_divisor = 2 ** (len(features) - 1)
        self.encoder = nn.ModuleList()
        prev = in_channels
        for width in features:
            self.encoder.append(level(prev, width))
            prev = width
        self.pool = nn.MaxPool2d(2)
        self.upsample = upsample if upsample is not None else nn.Identity()
        self.up_convs = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for deep, shallow in zip(features[:0:-1], features[-2::-1]):
            self.up_convs.append(up(deep, shallow))
            self.decoder.append(level(2 * shallow, shallow))
        self.head = nn.Conv2d(features[0], out_channels, kernel_size=1)
        self.deep_supervision = deep_supervision
        if deep_supervision:
            # finest first: the decoder levels at 1/2, 1/4, ... resolution (the full-resolution one is the main head's)
            self.aux_heads = nn.ModuleList(nn.Conv2d(w, out_channels, kernel_size=1) for w in features[1:-1])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The bottleneck feature and the skip features, shallow first."""
        skips = []
        for i, level in enumerate(self.encoder):
            if i:
                x = self.pool(x)
            x = level(x)
            skips.append(x)
        return skips.pop(), skips

    def forward_padded(self, x: torch.Tensor):
        x, skips = self.encode(x)
        levels = []
        for up_conv, level in zip(self.up_convs, self.decoder):
            x = up_conv(self.upsample(x))
            x = level(torch.cat([skips.pop(), x], dim=1))
            levels.append(x)
        return self.with_aux(self.head(x), levels[:-1])

    def with_aux(self, logits: torch.Tensor, decoder_levels: list[torch.Tensor]):
        """``logits`` alone, or with the auxiliary heads' logits (finest first) in deep-supervised training."""
        if not (self.deep_supervision and self.training):
            return logits
        return logits, [head(f) for head, f in zip(self.aux_heads, decoder_levels[::-1])]
