"""Several processes (gloo) under mixed precision: SyncBN statistics in float32, every shipped config's first steps.

The shipped CIFAR configs turn bfloat16 autocast on and MODEL.SYNC_BN is on by default, so a run of
several processes normalises bfloat16 convolution outputs with statistics of the global batch: those
statistics must be summed and kept in float32, and equal (within the convolution's bfloat16 error)
the float32 statistics one process computes on the whole batch.
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import REPO, load_tool

from wrn_det.engine.launch import launch

STEPS = 3


def _batch():
    g = torch.Generator().manual_seed(5)
    # 8 images whose channels have distinct means and spreads, so every statistic is checked
    x = torch.randn(8, 3, 12, 12, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    return x + torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1)


def _layers(norm):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
    bn = norm(6)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 6))
        bn.bias.copy_(torch.linspace(-0.2, 0.2, 6))
    return conv, bn


def _syncbn_worker(out_dir):
    from wrn_det.engine import comm
    from wrn_det.models.norm import SyncBatchNorm

    rank, world = comm.get_rank(), comm.get_world_size()
    conv, bn = _layers(SyncBatchNorm)
    x = _batch().chunk(world)[rank]
    dtypes = []
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = bn(conv(x))
        dtypes.append(str(y.dtype))
        y.float().square().mean().backward()  # the statistics' gradients go through the all-reduce too
    torch.save({"mean": bn.running_mean, "var": bn.running_var, "dtypes": dtypes,
                "buffers": [str(bn.running_mean.dtype), str(bn.running_var.dtype)], "count": int(bn.num_batches_tracked)},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_syncbn_under_bfloat16_keeps_float32_statistics_of_the_global_batch(tmp_path):
    launch(_syncbn_worker, num_gpus_per_machine=2, dist_url="auto", args=(str(tmp_path),))
    # the reference: one process, float32, BatchNorm over the whole batch
    conv, bn = _layers(nn.BatchNorm2d)
    x = _batch()
    for _ in range(STEPS):
        bn(conv(x))
    # the convolution's own bfloat16 error: its output rounded to bfloat16 moves the statistics by about this much
    with torch.no_grad():
        y32 = conv(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16 = conv(x).float()
    mean_err = (y16.mean(dim=(0, 2, 3)) - y32.mean(dim=(0, 2, 3))).abs().max().item()
    var_err = (y16.var(dim=(0, 2, 3)) - y32.var(dim=(0, 2, 3))).abs().max().item()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["dtypes"] == ["torch.bfloat16"] * STEPS  # the output keeps the input's dtype
        assert got["buffers"] == ["torch.float32", "torch.float32"] and got["count"] == STEPS
        # statistics of the global batch, not of each process's half (which differ by far more)
        assert torch.allclose(got["mean"], bn.running_mean, rtol=0, atol=4 * mean_err + 1e-4), (got["mean"], bn.running_mean)
        assert torch.allclose(got["var"], bn.running_var, rtol=0, atol=4 * var_err + 1e-4), (got["var"], bn.running_var)
    # what a per-process (unsynchronised) BatchNorm would hold is outside those bounds
    half = nn.BatchNorm2d(6)
    for _ in range(STEPS):
        half(conv(x[:4]))
    assert (half.running_var - bn.running_var).abs().max() > 4 * var_err + 1e-4
