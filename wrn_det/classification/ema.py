"""Exponential moving average of a model's weights (optional, ``MODEL_EMA``)."""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """Keep ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step.

    Floating-point parameters and buffers (BatchNorm statistics included) are averaged;
    integer buffers (``num_batches_tracked``) are copied. ``module`` is an evaluation-mode
    copy of the model on the same device, usable for evaluation and saving.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the current weights of ``model`` (same architecture)."""
        src = model.state_dict()
        avg, new, copy_dst, copy_src = [], [], [], []
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                avg.append(v)
                new.append(src[k].detach())
            else:
                copy_dst.append(v)
                copy_src.append(src[k])
        if avg:
            torch._foreach_lerp_(avg, new, 1.0 - self.decay)
        for d, s in zip(copy_dst, copy_src):
            d.copy_(s)

    def state_dict(self) -> dict:
        """Return the averaged weights as a state dict."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Load averaged weights saved by :meth:`state_dict`."""
        self.module.load_state_dict(state)
