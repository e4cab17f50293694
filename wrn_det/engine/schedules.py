"""Learning-rate schedules as fvcore parameter schedulers, applied through a torch LR scheduler."""
import logging
from typing import Sequence

import torch
from fvcore.common.param_scheduler import (
    ConstantParamScheduler,
    CosineParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)

from .errors import ConfigError

SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR")


class WarmupParamScheduler(ParamScheduler):
    """Wrap a scheduler with a warm-up over the first ``warmup_length`` fraction of training.

    ``linear`` ramps the factor from ``warmup_factor`` to 1; ``constant`` holds it.
    """

    def __init__(self, scheduler: ParamScheduler, warmup_factor: float, warmup_length: float, warmup_method: str = "linear"):
        if warmup_method not in ("linear", "constant"):
            raise ConfigError(f"SOLVER.WARMUP_METHOD must be 'linear' or 'constant', got {warmup_method!r}")
        self.scheduler = scheduler
        self.warmup_factor = warmup_factor
        self.warmup_length = warmup_length
        self.warmup_method = warmup_method

    def __call__(self, where: float) -> float:
        value = self.scheduler(where)
        if where >= self.warmup_length:
            return value
        if self.warmup_method == "constant":
            return value * self.warmup_factor
        alpha = where / self.warmup_length
        return value * (self.warmup_factor * (1 - alpha) + alpha)


def build_lr_multiplier(name: str, max_iter: int, steps: Sequence[int] = (), gamma: float = 0.1,
                        warmup_iters: int = 0, warmup_factor: float = 0.001, warmup_method: str = "linear",
                        cosine_end: float = 0.0) -> ParamScheduler:
    """Return a ParamScheduler mapping training progress in [0, 1] to the learning-rate multiplier.

    ``WarmupMultiStepLR`` multiplies by ``gamma`` at each of ``steps`` (iterations, or epochs
    when ``max_iter`` counts epochs); ``WarmupCosineLR`` decays from 1 to ``cosine_end``.
    """
    if max_iter <= 0:
        raise ConfigError(f"the schedule length must be positive, got {max_iter}")
    if name == "WarmupMultiStepLR":
        steps = [int(s) for s in steps]
        if steps != sorted(steps) or any(s <= 0 for s in steps):
            raise ConfigError(f"SOLVER.STEPS must be increasing positive values, got {tuple(steps)}")
        kept = [s for s in steps if s < max_iter]
        if len(kept) < len(steps):
            # as detectron2: a step at or past the end never takes effect (e.g. a shortened run)
            logging.getLogger("wrn_det").warning("SOLVER.STEPS %s at or past the end (%d) are ignored", steps[len(kept):], max_iter)
        if kept:
            # a step s takes effect from step s on (iteration s, or the start of epoch s)
            sched = MultiStepParamScheduler(values=[gamma**k for k in range(len(kept) + 1)], milestones=kept, num_updates=max_iter)
        else:
            sched = ConstantParamScheduler(1.0)
    elif name == "WarmupCosineLR":
        sched = CosineParamScheduler(1.0, cosine_end)
    else:
        raise ConfigError(f"SOLVER.LR_SCHEDULER_NAME must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    if warmup_iters > 0:
        sched = WarmupParamScheduler(sched, warmup_factor, min(warmup_iters / max_iter, 1.0), warmup_method)
    return sched


class LRMultiplier(torch.optim.lr_scheduler.LRScheduler):
    """Set each group's lr to its initial lr times ``multiplier(step / max_iter)``.

    ``step()`` is called once per iteration (or epoch); the state dict holds only the
    step count, so a resumed run recomputes the same rates.
    """

    def __init__(self, optimizer, multiplier: ParamScheduler, max_iter: int, last_iter: int = -1):
        self._multiplier = multiplier
        self._max_iter = max_iter
        super().__init__(optimizer, last_epoch=last_iter)

    def state_dict(self):
        """Return the step count and base rates."""
        return {"base_lrs": self.base_lrs, "last_epoch": self.last_epoch}

    def get_lr(self):
        """Return the learning rate of every parameter group at the current step."""
        where = min(self.last_epoch / self._max_iter, 1.0 - 1e-12) if self._max_iter else 0.0
        m = self._multiplier(max(where, 0.0))
        return [base * m for base in self.base_lrs]

    def _get_closed_form_lr(self):
        return self.get_lr()


def lr_at(base_lr: float, multiplier: ParamScheduler, step: int, max_iter: int) -> float:
    """Return the learning rate at ``step`` for a schedule of ``max_iter`` steps."""
    return base_lr * multiplier(min(step / max_iter, 1.0 - 1e-12))


__all__ = ["build_lr_multiplier", "LRMultiplier", "WarmupParamScheduler", "lr_at", "SCHEDULERS"]
