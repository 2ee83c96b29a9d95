"""Multi-process training with torch.distributed: ``torchrun --nproc_per_node=N -m nerveseg train ...``.

torchrun (or Slurm's srun, see docs/SCALE.md) starts N copies of the command and tells each its
place through the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Every copy holds
the same model; DistributedDataParallel averages the gradients, so each optimiser step sees the
whole global batch. The design choices, and why:

- ``train.batch_size`` stays the *global* batch: the same config trains the same recipe on 1 or N
  processes. Each step's global batch is drawn by one generator seeded by (seed, epoch) on every
  rank, exactly as a single process draws it, and augmented whole on every rank (augmentation is
  a few batched ``grid_sample`` calls, small beside the network); rank r then keeps images
  r, r + N, r + 2N, ... of it. So a run on N processes sees the same augmented images as one
  process, and with synchronised BatchNorm reaches the same weights up to floating point.
- Each rank's loss is weighted by its share of the global batch (``n_r * N / n``), so DDP's mean
  of the ranks' gradients is the gradient of the mean loss over the global batch even when the
  last batch of an epoch does not split evenly.
- BatchNorm: by default each rank normalises with its own images' statistics (what DDP does;
  cheaper, and a different recipe: statistics of batch/N images). ``sync_batchnorm`` makes them
  statistics of the global batch: torch's ``SyncBatchNorm`` on GPUs, and on the CPU, which torch's
  does not support, ``CpuSyncBatchNorm2d`` below, the same computation over gloo.
- Validation and every write happen on rank 0 only; the others wait at a barrier, so a resumed
  run reads files that are complete. ``--resume`` works the same under torchrun.
- Backend: NCCL when the device is CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``world_size`` 1 and rank 0 for an ordinary single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a per-rank number over all ranks (NCCL reduces CUDA tensors only, gloo CPU ones)."""
        if not self.enabled:
            return value
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (an exception raised on rank 0 can be sent this way too)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def rank_slice(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's images of a global batch: r, r + N, r + 2N, ... (balanced to within one)."""
        return indices[self.rank :: self.world_size] if self.enabled else indices


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group torchrun describes in the environment (no-op for a single process).

    NCCL for CUDA devices, gloo otherwise. Idempotent: a second call (the next fold of
    ``--all-folds``) reuses the group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        # a generous timeout: rank 0 validates and writes checkpoints while the others wait
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistributedContext(rank=rank, world_size=dist.get_world_size(), local_rank=local_rank)


def shutdown_distributed(synchronise: bool = False) -> bool:
    """Destroy the process group; True when there was one. With ``synchronise`` (a command that
    finished on every rank) the ranks first meet at a barrier, so none tears its connections down
    while another is still using them; a failed rank skips it, as the others may never arrive."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if synchronise:
        dist.barrier()
    dist.destroy_process_group()
    return True


def rank_device(device: torch.device, ctx: DistributedContext) -> torch.device:
    """One GPU per process: rank's LOCAL_RANK-th CUDA device when the run asks for CUDA."""
    if ctx.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ctx.local_rank)
    return device


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks: every rank's loss depends on
    every rank's contribution. (torch.distributed.nn.functional.all_reduce did this and is
    deprecated; the replacement in torch is private.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CpuSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch, gathered over
    gloo: the computation of ``torch.nn.SyncBatchNorm``, which runs on GPUs only.

    Each rank sums x and x^2 per channel and counts its pixels; one differentiable all-reduce
    (differentiable: its backward all-reduces the gradients, so each rank's inputs get the
    gradient through the shared statistics from every rank's loss)
    gives the global mean and (biased) variance; the running statistics are updated with the
    unbiased variance, as BatchNorm does. Same parameters and buffers as BatchNorm2d, so weights
    load into either. Outside training, or without a process group, it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x32 = x.float()
        count = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=torch.float32, device=x.device)
        local = torch.cat([x32.sum((0, 2, 3)), (x32 * x32).sum((0, 2, 3)), count])
        total = _AllReduceSum.apply(local)
        c = self.num_features
        n = total[2 * c]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * (n / (n - 1).clamp(min=1))
            self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
            self.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach())
        y = (x32 - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``model`` made synchronised: torch's SyncBatchNorm on CUDA, ours on the CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CpuSyncBatchNorm2d):
        sync = CpuSyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, _convert_cpu(child))
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (what is saved and validated)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


__all__ = [
    "CpuSyncBatchNorm2d",
    "DistributedContext",
    "convert_sync_batchnorm",
    "init_distributed",
    "launched_by_torchrun",
    "rank_device",
    "shutdown_distributed",
    "unwrap",
]
