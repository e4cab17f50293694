"""The optimizer step both trainers share: mixed precision, gradient clipping, the non-finite-loss stop.

``SOLVER.AMP.ENABLED`` + ``SOLVER.AMP.DTYPE`` (``bfloat16`` | ``float16``) mean autocast on the
run's device, CUDA or the CPU, in either dtype; ``float16`` with a gradient scaler (on a CPU
without float16 units it is slow: a check, not a speed-up). ``SOLVER.CLIP_GRADIENTS``
(detectron2's keys) clips after unscaling. Nothing in a step waits for the device: with a
fused optimizer (:func:`fused_if_supported`) the scaler skips a step with non-finite
gradients on the device, without reading its flag on the host.
"""
import contextlib
from typing import Callable, List, Optional

import torch

from .errors import ConfigError, NonFiniteLossError

__all__ = ["AMP_DTYPES", "amp_dtype", "gradient_clipper", "OptimizerStep", "non_finite_error", "NonFiniteLossError",
           "fused_if_supported"]

AMP_DTYPES = ("bfloat16", "float16")


def amp_dtype(amp_cfg, device: torch.device) -> Optional[torch.dtype]:
    """Return the autocast dtype ``SOLVER.AMP`` asks for on ``device``, or None for float32.

    float16 and bfloat16 both work on CUDA and on the CPU (whose autocast has float16 since
    torch 2.4). Raises :class:`ConfigError` for an unknown ``SOLVER.AMP.DTYPE``.
    """
    name = amp_cfg.get("DTYPE", "float16")
    if name not in AMP_DTYPES:
        raise ConfigError(f"SOLVER.AMP.DTYPE must be one of {', '.join(AMP_DTYPES)}, got {name!r}")
    if not amp_cfg.ENABLED:
        return None
    if device.type not in ("cpu", "cuda"):
        return None
    return getattr(torch, name)


def fused_if_supported(params, device: torch.device) -> dict:
    """Return the keyword arguments that make ``torch.optim.SGD`` fused on ``device``: ``{"fused": True}`` on CUDA.

    The fused kernel updates all parameters at once and takes the gradient scaler's
    non-finite flag on the device (no wait for the GPU in a float16 step). The CPU keeps the
    default (``foreach``) implementation, whose results the tests and checkpoints were made with.
    """
    if device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}


def gradient_clipper(clip_cfg) -> Optional[Callable[[List[torch.nn.Parameter]], None]]:
    """Return a function clipping the gradients of a parameter list as ``SOLVER.CLIP_GRADIENTS`` says, or None.

    ``value``: each gradient entry to [-CLIP_VALUE, CLIP_VALUE]; ``norm``: each parameter's
    gradient norm (as detectron2); ``full_model``: the norm of all gradients together.
    """
    if clip_cfg is None or not clip_cfg.ENABLED:
        return None
    kind, value, norm_type = clip_cfg.CLIP_TYPE, float(clip_cfg.CLIP_VALUE), float(clip_cfg.NORM_TYPE)
    if kind not in ("value", "norm", "full_model"):
        raise ConfigError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be value, norm or full_model, got {kind!r}")

    def clip(params: List[torch.nn.Parameter]) -> None:
        grads = [p for p in params if p.grad is not None]
        if kind == "value":
            torch.nn.utils.clip_grad_value_(grads, value)
        elif kind == "norm":
            for p in grads:
                torch.nn.utils.clip_grad_norm_([p], value, norm_type)
        else:
            torch.nn.utils.clip_grad_norm_(grads, value, norm_type)

    return clip


class OptimizerStep:
    """Backward and update for one iteration: ``step(loss)``; ``autocast()`` for the forward pass.

    With ``dtype`` float16 the loss is scaled (``torch.amp.GradScaler``) and the gradients
    unscaled before clipping; with bfloat16 or None no scaler is involved. The scaler's
    state is part of the training checkpoint (:meth:`state_dict`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, dtype: Optional[torch.dtype] = None,
                 clip: Optional[Callable] = None):
        self.optimizer = optimizer
        self.device = device
        self.dtype = dtype
        self.clip = clip
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.scaler = torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu",
                                           enabled=dtype == torch.float16)

    def autocast(self):
        """Return the autocast context of the forward pass (a no-op in float32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor) -> None:
        """Zero the gradients, backpropagate ``loss``, clip, and take the optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            self.clip(self.params)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        """Return the gradient scaler's state."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the gradient scaler's state (an empty dict when it was disabled)."""
        if state:
            self.scaler.load_state_dict(state)


def non_finite_error(became: str, where: str, detail: str, last_checkpoint: Optional[str]) -> NonFiniteLossError:
    """Return the error that stops a run whose loss ``became`` NaN/inf (or "non-finite") at ``where``.

    The message names the place, the values (``detail``), that nothing was saved, and the
    last good checkpoint to resume or inspect.
    """
    last = last_checkpoint or "none (no checkpoint was written before it)"
    return NonFiniteLossError(f"the training loss became {became} {where} ({detail}); training stopped without "
                              f"saving it; the last good checkpoint is {last}; lower SOLVER.BASE_LR or check the data")
