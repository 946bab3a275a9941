"""BatchNorm helpers. `frozen_bn_stats`: forward passes that leave running statistics alone.

Cross-replica BatchNorm under DDP: the statistics of the global batch, not of one process's
share. On CUDA that is torch's SyncBatchNorm. Its kernels are CUDA-only and DDP refuses it on
CPU modules, so on the CPU (gloo) the same statistics come from two autograd-aware all-reduces
in `CpuSyncBatchNorm`: DDP on CPUs trains the same model, and CI can test it."""

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn import functional as dist_nn


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batches of all processes of `process_group` (the world when None);
    outside training or a process group of several processes it is plain BatchNorm."""

    process_group = None

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_initialized() else None)
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims, shape = [0, *range(2, x.dim())], (1, -1, *([1] * (x.dim() - 2)))
        xf = x.float()
        count = xf.new_tensor([x.numel() // x.shape[1]])
        total = dist_nn.all_reduce(torch.cat([xf.sum(dims), count]), group=group)
        n, mean = total[-1], total[:-1] / total[-1]
        var = dist_nn.all_reduce(((xf - mean.view(shape)) ** 2).sum(dims), group=group) / n
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), factor)
        out = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def convert_sync_bn(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm of `module` made cross-replica, parameters and running statistics kept
    (torch's conversion): torch's SyncBatchNorm on CUDA, CpuSyncBatchNorm elsewhere."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if device_type != "cuda":
        for m in module.modules():
            if type(m) is nn.SyncBatchNorm:
                m.__class__ = CpuSyncBatchNorm
    return module


def frozen_bn_stats(module: nn.Module) -> contextlib.ExitStack:
    """`with frozen_bn_stats(net):` batch statistics still normalise, but running averages are
    left alone (momentum 0): the attack's extra forward passes must not pollute the statistics
    used at inference. Leaving the block restores each momentum."""
    restore = contextlib.ExitStack()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            restore.callback(setattr, m, "momentum", m.momentum)
            m.momentum = 0.0
    return restore
