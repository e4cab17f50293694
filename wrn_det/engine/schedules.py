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
                        cosine_end: float = 0.0, length_key: str = "SOLVER.MAX_ITER") -> ParamScheduler:
    """Return a ParamScheduler mapping training progress in [0, 1] to the learning-rate multiplier.

    ``WarmupMultiStepLR`` multiplies by ``gamma`` at each of ``steps`` (iterations, or epochs
    when ``max_iter`` counts epochs); ``WarmupCosineLR`` decays from 1 to ``cosine_end``.
    ``length_key`` names the config key that sets ``max_iter`` in errors.
    """
    if max_iter <= 0:
        raise ConfigError(f"{length_key} must be positive (the schedule length), got {max_iter}")
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


class LRSchedule:
    """The learning rate of every iteration, applied to an optimizer: the one way both trainers set it.

    Each parameter group's rate is its initial rate (``initial_lr``, recorded at
    construction) times ``multiplier(iteration / max_iter)``. The rate is a function of the
    iteration alone, so a resumed run recomputes exactly the rates of the run it continues
    and there is no scheduler state to save.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: ParamScheduler, max_iter: int):
        self.optimizer = optimizer
        self.multiplier = multiplier
        self.max_iter = int(max_iter)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])

    def factor(self, iteration: int) -> float:
        """Return the multiplier at ``iteration`` (0-based; clipped to the end of the schedule)."""
        where = min(iteration / self.max_iter, 1.0 - 1e-12) if self.max_iter else 0.0
        return self.multiplier(max(where, 0.0))

    def apply(self, iteration: int) -> float:
        """Set every group's rate for ``iteration``; returns the rate of the first group."""
        m = self.factor(iteration)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * m
        return self.optimizer.param_groups[0]["lr"]


__all__ = ["build_lr_multiplier", "LRSchedule", "WarmupParamScheduler", "SCHEDULERS"]
