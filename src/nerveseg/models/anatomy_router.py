"""Which model of a shipped set an image is for: a linear probe on ImageNet features.

One segmentation network per anatomy can beat one network shared by all (issue 22: the median nerve at
the wrist and the nerves of regional anaesthesia), but only if no user has to say which anatomy an image
shows. ``AnatomyRouter`` says it: the first stages of the ImageNet EfficientNet-Lite0 trunk (frozen,
strides 2-16, 0.7M parameters), their stride-8 and stride-16 features averaged over the image, and a
linear classifier over those 152 numbers (fitted by ``training.router``). It reads the same
letterboxed, standardised input the segmentation networks read, so routing costs one small trunk pass.

The trunk is never trained here: ImageNet features are general, and a probe on them is what a few
hundred images can fit without learning the scanner instead of the anatomy (which a fine-tuned trunk
would do first). What it does learn is stated by its cross-validated accuracy, saved beside it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from .efficientnet_unet import EfficientNetLiteEncoder

# the encoder's feature levels the probe reads (0-based: strides 2, 4, 8, 16, 32): stride 8 and 16,
# after which the trunk is cut (the stride-32 stage holds three quarters of Lite0's weights)
PROBE_LEVELS = (2, 3)


class AnatomyRouter(nn.Module):
    """Scores ``routes`` (names of the models an image may go to) for a batch of network inputs.

    Args:
        routes: the route names, in the order of the output logits (at least two).
        in_channels: image channels of the input (1: grey ultrasound).
        variant: the EfficientNet-Lite trunk ("lite0").

    Shapes: (B, in_channels, H, W) standardised input -> (B, len(routes)) logits.
    ``pooled_features`` gives the (B, feature_dim) numbers the probe reads, before standardisation.
    """

    def __init__(self, routes: Sequence[str], in_channels: int = 1, variant: str = "lite0"):
        super().__init__()
        routes = [str(r) for r in routes]
        if len(routes) < 2 or len(set(routes)) != len(routes):
            raise ConfigError(f"a router needs two or more distinct routes, got {routes}")
        self.routes = routes
        self.trunk = EfficientNetLiteEncoder(in_channels, variant)
        self._cut_trunk()
        self.feature_dim = sum(self.trunk.channels[i] for i in PROBE_LEVELS)
        # standardisation of the pooled features and the linear probe, both set by the fit
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feature_scale", torch.ones(self.feature_dim))
        self.probe = nn.Linear(self.feature_dim, len(routes))
        self.requires_grad_(False)

    def _cut_trunk(self) -> None:
        """Drop the blocks past the deepest level the probe reads (their weights are never used)."""
        last = self.trunk.taps[max(PROBE_LEVELS)]
        self.trunk._blocks = self.trunk._blocks[: last + 1]
        self.trunk.taps = self.trunk.taps[: max(PROBE_LEVELS) + 1]

    def load_imagenet_trunk(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Put the ImageNet weights into the trunk (a whole encoder's state dict; the cut blocks' keys are
        dropped, every kept key must be matched)."""
        full = EfficientNetLiteEncoder(self.trunk.in_channels, self.trunk.variant)
        full.load_imagenet(state_dict)
        kept = {k: v for k, v in full.state_dict().items() if k in self.trunk.state_dict()}
        self.trunk.load_state_dict(kept, strict=True)

    @torch.inference_mode()
    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk.eval()(x)
        return torch.cat([features[i].mean(dim=(2, 3)) for i in PROBE_LEVELS], dim=1)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe((self.pooled_features(x) - self.feature_mean) / self.feature_scale)

    def set_probe(self, mean: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Install a fitted probe: feature standardisation (feature_dim,) and a (routes, feature_dim) linear map."""
        k, d = len(self.routes), self.feature_dim
        shapes = {"mean": (tuple(mean.shape), (d,)), "scale": (tuple(scale.shape), (d,)),
                  "weight": (tuple(weight.shape), (k, d)), "bias": (tuple(bias.shape), (k,))}
        wrong = {name: got for name, (got, want) in shapes.items() if got != want}
        if wrong:
            raise ConfigError(f"the probe does not fit a router of {k} routes on {d} features: {wrong}")
        if not bool((scale > 0).all()):
            raise ConfigError("feature scales must be positive")
        self.feature_mean.copy_(mean)
        self.feature_scale.copy_(scale)
        self.probe.weight.copy_(weight)
        self.probe.bias.copy_(bias)
