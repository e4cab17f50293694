"""Choosing the training device from ``MODEL.DEVICE`` and preparing it."""
import torch

from . import comm
from .errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """Return the device named by ``MODEL.DEVICE``.

    ``""`` or ``"auto"``: this process's GPU (``cuda:<local rank>``) when CUDA is present,
    else the CPU. ``"cuda"``: this process's GPU, an error without CUDA. ``"cuda:N"`` and
    ``"cpu"`` as given; ``"meta"`` builds shapes only, with no memory.
    """
    spec = (spec or "auto").strip()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"MODEL.DEVICE is {spec!r} but no CUDA device is available; use 'auto' or 'cpu'")
        if spec == "cuda":
            return torch.device("cuda", comm.get_local_rank() % torch.cuda.device_count())
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"MODEL.DEVICE must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from None
    if dev.type not in ("cpu", "cuda", "meta"):
        raise ConfigError(f"MODEL.DEVICE must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    return dev


def prepare_device(device: torch.device) -> torch.device:
    """Make ``device`` the current CUDA device when it is a GPU; returns it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
