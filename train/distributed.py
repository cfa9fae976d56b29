"""torch.distributed plumbing kept apart from the model and the loop (torchtitan style).

Launch with ``torchrun --nproc_per_node N freezeframe pretrain ...``; on CPU the gloo
backend is used (this is how the 2-rank tests run), on CUDA nccl. BatchNorm is synchronised
across ranks: ``torch.nn.SyncBatchNorm`` on CUDA, :class:`NaiveSyncBatchNorm` (all-reduce of
mean and mean of squares, as pytorchvideo/detectron2 do) elsewhere, since torch's
SyncBatchNorm refuses CPU tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.dist import discover_rank, join_process_group, resolve_device
from pipeline.errors import FreezeframeError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun (or srun); pick this rank's device.

    Rank discovery and the device choice are ``pipeline.dist``'s (shared with stage 1)."""
    info = discover_rank()
    dev = resolve_device(device, info)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info.world > 1 and not join_process_group(info, "nccl" if dev.type == "cuda" else "gloo"):
        raise FreezeframeError(f"{info.world} {info.launcher} ranks but no MASTER_ADDR/MASTER_PORT to meet at: "
                               "export them in the batch script (README, section Cluster)")
    return DistInfo(info.rank, info.world, info.local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class _AllReduceMean(torch.autograd.Function):
    """All-reduce (mean over ranks) whose backward is also an all-reduce mean."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x / dist.get_world_size()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = g.clone()
        dist.all_reduce(g)
        return g / dist.get_world_size()


class NaiveSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (any dims) with batch statistics averaged over all ranks.

    Assumes every rank has the same batch size (DistributedSampler with drop_last).
    Input (N, C, ...). Falls back to plain BatchNorm in eval mode or without a process group.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(input)
        dims = [0] + list(range(2, input.dim()))
        mean = input.mean(dim=dims)
        meansqr = (input * input).mean(dim=dims)
        both = _AllReduceMean.apply(torch.cat([mean, meansqr]))
        mean, meansqr = both.split(input.shape[1])
        var = meansqr - mean * mean
        n = input.numel() / input.shape[1] * dist.get_world_size()
        with torch.no_grad():
            self.num_batches_tracked += 1  # type: ignore[operator]
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)  # type: ignore[union-attr]
            self.running_var.mul_(1 - m).add_(var.detach() * n / max(n - 1, 1), alpha=m)  # type: ignore[union-attr]
        invstd = torch.rsqrt(var + self.eps)
        scale = self.weight * invstd
        shift = self.bias - mean * scale
        shape = [1, -1] + [1] * (input.dim() - 2)
        return input * scale.reshape(shape) + shift.reshape(shape)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm by its synchronised counterpart for ``device``."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, NaiveSyncBatchNorm):
        out = NaiveSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (no autograd), for logging."""
    if not dist.is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` (B, ...) concatenated in rank order, (world * B, ...), no autograd.

    Every rank must pass the same shape (the loop's DistributedSampler drops uneven last
    batches); without a process group (or with one rank) ``x`` itself is returned.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
