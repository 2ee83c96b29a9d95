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


def cpu_latency_ms(model: nn.Module, height: int = 512, width: int = 512, repeats: int = 10, warmup: int = 2,
                   channels_last: bool = True, in_channels: int = 1) -> float:
    """Median wall time (ms) of one batch-1 forward pass in eval mode on the CPU.

    A benchmark helper, not a test: compare numbers only within one run on one machine.
    """
    import statistics
    import time

    was_training = model.training
    model = model.eval()
    x = torch.randn(1, in_channels, height, width)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    model.train(was_training)
    return statistics.median(times)
