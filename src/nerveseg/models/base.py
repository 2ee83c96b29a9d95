"""The model contract: (B, 1, H, W) in, logits (B, 1, H, W) out, for any H and W."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationModel(nn.Module):
    """Base class of every nerveseg network.

    Encoder-decoder networks with ``depth`` 2x poolings need sides divisible by ``2**depth``.
    Rather than refuse the 442x565 or 534x512 frames ultrasound machines produce, ``forward``
    pads the input on the bottom/right with zeros to the next multiple and crops the logits
    back, so the output always has the input's size.

    Subclasses implement ``forward_padded`` on inputs whose sides are multiples of
    ``size_divisor``. ``forward`` returns raw logits; ``predict`` returns probabilities.
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
        if pad_h or pad_w:
            logits = logits[..., :h, :w]
        return logits

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities in [0, 1] in eval mode."""
        self.eval()
        return torch.sigmoid(self(x))
