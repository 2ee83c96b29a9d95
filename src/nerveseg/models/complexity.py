"""Model size and cost: parameter counts and FLOPs measured by PyTorch's own counter."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_gflops(model: nn.Module, height: int = 512, width: int = 512, in_channels: int = 1) -> float:
    """Forward-pass GFLOPs for one image (a multiply-add counts as 2 FLOPs).

    Counted by ``torch.utils.flop_counter`` (convolutions and matrix products; element-wise
    operations such as BatchNorm, ReLU and pooling are not counted, as is customary).
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, height, width)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / 1e9
