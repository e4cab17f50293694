"""Normalisation layers, chosen when a network is built (``norm_layer``, as torchvision's ResNet).

* ``BN``: ``nn.BatchNorm2d``;
* ``SyncBN``: :class:`SyncBatchNorm`, statistics of the global batch of a distributed run,
  on GPUs (``nn.SyncBatchNorm``'s fused kernels) and on CPUs with gloo (an all-reduce of
  the per-channel sums); in one process exactly BatchNorm;
* ``FrozenBN``: torchvision's ``FrozenBatchNorm2d`` (fixed statistics and affine);
* ``GN``: ``nn.GroupNorm`` with 32 groups.

:func:`get_norm` returns the layer class of a kind; every network of ``wrn_det.models``
takes it as ``norm_layer`` and calls it as ``norm_layer(channels)`` (or with ``eps=``).
:func:`convert_norm` turns the normalisation layers of a built module into another kind,
keeping their statistics and affine parameters: what freezing part of a detector does.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce
from torch.nn.modules._functions import SyncBatchNorm as sync_batch_norm  # nn.SyncBatchNorm's own function
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["NORMS", "SyncBatchNorm", "FrozenBatchNorm2d", "get_norm", "convert_norm", "is_batch_norm"]

#: The kinds :func:`get_norm` knows (``MODEL.WRN.NORM``, ``MODEL.FPN.NORM``).
NORMS = ("BN", "SyncBN", "FrozenBN", "GN")


def _distributed_training(module: nn.Module) -> bool:
    return module.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the batch over all processes, on any device.

    On CUDA the statistics are gathered by ``nn.SyncBatchNorm``'s own autograd function
    (its fused kernels, which accumulate half and bfloat16 inputs in float32 and return float32
    means and inverse deviations). ``nn.SyncBatchNorm`` refuses CPU tensors (and
    DistributedDataParallel refuses it on CPU modules); on the CPU (gloo) the per-channel count,
    sum and centred sum of squares are summed over processes with the differentiable
    ``all_reduce`` of ``torch.distributed.nn``, so output and gradients are those of plain
    BatchNorm on the global batch. Under any autocast the statistics are computed, summed and
    kept in float32 (a bfloat16 sum over 100,000+ values per channel keeps 8 significant bits);
    the output has the input's dtype. Outside training, or in a single process, it is exactly
    ``nn.BatchNorm2d``, whose parameters, buffers and state-dict keys it has. Calling it
    returns the normalised tensor.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the batch-normalised ``x`` (N, C, H, W), in ``x``'s dtype."""
        if not _distributed_training(self):
            return super().forward(x)
        if x.device.type == "cuda":
            return self._forward_cuda(x)
        return self._forward_all_reduce(x)

    def _momentum(self) -> float:
        if not self.track_running_stats:
            return 0.0
        self.num_batches_tracked.add_(1)
        return self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)

    def _forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        momentum = self._momentum()
        mean, var = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        # outside autocast: the kernels then see the parameters and buffers in their own float32
        with torch.autocast("cuda", enabled=False):
            return sync_batch_norm.apply(x, self.weight, self.bias, mean, var, self.eps, momentum,
                                         dist.group.WORLD, dist.get_world_size())

    def _forward_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self._all_reduce_float32(x.float()).to(x.dtype)

    def _all_reduce_float32(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        shape = (1, c, 1, 1)
        count = torch.full((1,), float(x.numel() // c), dtype=torch.float32, device=x.device)
        # two reductions: the mean first, then the centred squares, for the same
        # numerical behaviour as a two-pass variance on one device
        total = differentiable_all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), count]))
        n = total[c]
        mean = total[:c] / n
        xc = x - mean.view(shape)
        var = differentiable_all_reduce((xc * xc).sum(dim=(0, 2, 3))) / n
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self._momentum()
                # running_var holds the unbiased variance, as nn.BatchNorm2d
                unbiased = var.detach() * (n / (n - 1).clamp(min=1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y


def _group_norm(num_features: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(32, num_features, eps=eps)


_KINDS: Dict[str, Callable[..., nn.Module]] = {
    "BN": nn.BatchNorm2d, "SyncBN": SyncBatchNorm, "FrozenBN": FrozenBatchNorm2d, "GN": _group_norm,
}


def get_norm(kind: Optional[str]) -> Optional[Callable[..., nn.Module]]:
    """Return the layer class of ``kind`` (``BN``, ``SyncBN``, ``FrozenBN``, ``GN``), None for "" or None.

    The result is called as ``norm_layer(channels)`` or ``norm_layer(channels, eps=...)``.
    Raises ``ValueError`` for another kind.
    """
    if not kind:
        return None
    if kind not in _KINDS:
        raise ValueError(f"unknown norm {kind!r}; expected one of {', '.join(NORMS)}")
    return _KINDS[kind]


def is_batch_norm(m: nn.Module) -> bool:
    """Return True for every BatchNorm kind: trained, synchronised or frozen."""
    return isinstance(m, (_BatchNorm, FrozenBatchNorm2d))


def _converted(bn: nn.Module, kind: str) -> nn.Module:
    new = get_norm(kind)(bn.num_features, eps=bn.eps)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src, dst = getattr(bn, name, None), getattr(new, name, None)
            if src is not None and dst is not None:
                dst.copy_(src)
        if getattr(bn, "num_batches_tracked", None) is not None and getattr(new, "num_batches_tracked", None) is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    ref = bn.running_mean if getattr(bn, "running_mean", None) is not None else bn.weight
    new = new.to(ref.device)
    new.train(bn.training)
    return new


def convert_norm(module: nn.Module, kind: str) -> nn.Module:
    """Turn every BatchNorm of ``module`` into ``kind`` (``BN``, ``SyncBN`` or ``FrozenBN``), in place.

    Statistics and affine parameters are kept (a frozen layer's become trainable ones and
    back). A layer reachable by several paths is converted once and the result put at
    every path. Returns ``module``, or its replacement when ``module`` itself is a BatchNorm.
    """
    if kind not in ("BN", "SyncBN", "FrozenBN"):
        raise ValueError(f"convert_norm turns BatchNorm into BN, SyncBN or FrozenBN, not {kind!r}")
    target = get_norm(kind)
    done: Dict[int, nn.Module] = {}

    def convert(m: nn.Module) -> nn.Module:
        if is_batch_norm(m):
            if type(m) is target:
                return m
            if id(m) not in done:
                done[id(m)] = _converted(m, kind)
            return done[id(m)]
        if id(m) in done:
            return m
        done[id(m)] = m
        for name, child in list(m._modules.items()):
            if child is not None:
                new = convert(child)
                if new is not child:
                    setattr(m, name, new)
        return m

    return convert(module)
