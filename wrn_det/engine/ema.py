"""Exponential moving average of a model's weights (``MODEL_EMA.ENABLED``, ``MODEL_EMA.DECAY``), both trainers.

Built on ``torch.optim.swa_utils.AveragedModel`` with buffers averaged too (BatchNorm
statistics). Its ready-made ``get_ema_multi_avg_fn`` would decay integer buffers as well
(BatchNorm's ``num_batches_tracked``, which then stays frozen), so the averaging function
here lerps floating-point tensors and copies the others. Its ``update_parameters`` reads its
update counter (a tensor on the model's device) twice per call, a wait for the GPU at every
step; the update here counts on the host and does the same arithmetic.
"""
from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from typing import Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .errors import ConfigError

__all__ = ["ModelEMA", "restore_ema"]

logger = logging.getLogger("wrn_det")


def _ema_avg_fn(decay: float):
    @torch.no_grad()
    def average(ema_tensors, model_tensors, num_averaged):
        # AveragedModel groups tensors by device and dtype: a group is all floats or all integers
        if torch.is_floating_point(ema_tensors[0]) or torch.is_complex(ema_tensors[0]):
            torch._foreach_lerp_(ema_tensors, model_tensors, 1.0 - decay)
        else:
            for e, m in zip(ema_tensors, model_tensors):
                e.copy_(m)

    return average


class ModelEMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimizer step (the first update copies).

    ``module`` is an evaluation-mode copy of the model on the same device, used for
    evaluation and saved as a state dict of the model's own keys.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = float(decay)
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"MODEL_EMA.DECAY must be in [0, 1), got {decay}")
        self.averaged = AveragedModel(model, multi_avg_fn=_ema_avg_fn(self.decay), use_buffers=True)
        self.module = self.averaged.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._updates = 0  # the host's copy of averaged.n_averaged

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards the current weights of ``model`` (same architecture); nothing waits for the device.

        What ``AveragedModel.update_parameters`` does with buffers averaged: the first update
        copies, the later ones apply the averaging function per (device, dtype) group.
        """
        mine = list(itertools.chain(self.module.parameters(), self.module.buffers()))
        theirs = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        if self._updates == 0:
            for e, m in zip(mine, theirs):
                e.copy_(m)
        else:
            groups = defaultdict(lambda: ([], []))
            for e, m in zip(mine, theirs):
                group = groups[(e.device, e.dtype)]
                group[0].append(e)
                group[1].append(m.to(e.device))
            average = self.averaged.multi_avg_fn
            for ema_tensors, model_tensors in groups.values():
                average(ema_tensors, model_tensors, None)
        self._updates += 1
        self.averaged.n_averaged.add_(1)

    def state_dict(self) -> dict:
        """Return the averaged weights as a state dict of the model's keys."""
        return self.module.state_dict()

    @property
    def num_updates(self) -> int:
        """Return how many updates the average has seen."""
        return self._updates

    def load_state_dict(self, state: dict, num_updates: int = 1) -> None:
        """Load averaged weights saved by :meth:`state_dict`, with the number of updates they had seen."""
        self.module.load_state_dict(state)
        self._updates = int(num_updates)
        self.averaged.n_averaged.fill_(self._updates)


def restore_ema(ema: Optional[ModelEMA], checkpoint: dict, model: nn.Module) -> Optional[ModelEMA]:
    """Return the EMA a resumed run continues with (None when the run keeps none).

    ``checkpoint``: a training checkpoint with ``ema`` and ``ema_updates``. One without EMA
    weights (the run that wrote it had ``MODEL_EMA.ENABLED False``) gives a fresh average of
    ``model``'s current weights, with a warning.
    """
    if ema is None:
        return None
    if checkpoint.get("ema") is not None:
        ema.load_state_dict(checkpoint["ema"], checkpoint.get("ema_updates", 1))
        return ema
    logger.warning("the checkpoint has no EMA weights; the EMA restarts from the current weights")
    return ModelEMA(model, ema.decay)
