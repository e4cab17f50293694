"""Batch normalisation over the global batch of a distributed run, on any device.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, so CPU runs with gloo (and tests)
would otherwise normalise each process's share of the batch with its own statistics
and train a different model than one process on the whole batch. :class:`AllReduceBatchNorm2d`
sums the per-channel count, sum and centred sum of squares over processes with the
differentiable ``all_reduce`` of ``torch.distributed.nn``, so its output and gradients
are those of plain BatchNorm on the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

__all__ = ["AllReduceBatchNorm2d", "convert_sync_batchnorm"]


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch over all processes.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``; outside
    training, or in a single process, it is exactly ``nn.BatchNorm2d``. Calling it
    returns the normalised tensor.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the batch-normalised ``x`` (N, C, H, W)."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        count = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
        # two reductions: the mean first, then the centred squares, for the same
        # numerical behaviour as a two-pass variance on one device
        total = differentiable_all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), count]))
        n = total[c]
        mean = total[:c] / n
        xc = x - mean.view(1, c, 1, 1)
        var = differentiable_all_reduce((xc * xc).sum(dim=(0, 2, 3))) / n
        y = xc * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                # running_var holds the unbiased variance, as nn.BatchNorm2d
                unbiased = var.detach() * (n / (n - 1).clamp(min=1.0))
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased, momentum)
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Return ``module`` with every ``BatchNorm2d`` synchronised over processes.

    CUDA modules get ``torch.nn.SyncBatchNorm`` (fused kernels); others get
    :class:`AllReduceBatchNorm2d`. Parameters and buffers are kept.
    """
    if any(p.is_cuda for p in module.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        new = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = _convert(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
