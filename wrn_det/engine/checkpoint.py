"""Checkpoint files: atomic writes, ``weights_only`` loads, ``last_checkpoint`` and RNG states."""
import os
import pickle
import random
import tempfile
import zipfile
from typing import Optional

import numpy as np
import torch

from .errors import WrnDetError

LAST_CHECKPOINT = "last_checkpoint"


def _umask_mode() -> int:
    # mkstemp creates files readable by the owner only; give the result the mode a plain open() would
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str, write, suffix: str = "") -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``.

    A reader never sees a half-written file, a failure leaves the previous file intact and
    no temporary file behind, and the file gets the mode a plain ``open`` would give it.
    Returns ``path``.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj, path: str) -> str:
    """Save ``obj`` with ``torch.save`` atomically (see :func:`atomic_write`); returns ``path``."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), suffix=".pth")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Return the object stored at ``path``, read with ``torch.load(weights_only=True)``.

    Raises :class:`WrnDetError` with one line if the file is missing, truncated or holds
    anything but tensors and plain containers.
    """
    if not path or not os.path.isfile(path):
        raise WrnDetError(f"checkpoint file {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as e:
        msg = " ".join(str(e).split())[:300]
        raise WrnDetError(f"checkpoint file {path!r} cannot be read as a torch checkpoint of tensors: {msg}") from None


def write_last_checkpoint(output_dir: str, filename: str) -> None:
    """Record ``filename`` (relative to ``output_dir``) in ``output_dir/last_checkpoint``, atomically."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(os.path.basename(filename))

    atomic_write(os.path.join(output_dir, LAST_CHECKPOINT), write)


def read_last_checkpoint(output_dir: str) -> Optional[str]:
    """Return the full path named by ``output_dir/last_checkpoint``, or None if there is none."""
    path = os.path.join(output_dir, LAST_CHECKPOINT)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        name = f.read().strip()
    full = os.path.join(output_dir, name)
    return full if name and os.path.isfile(full) else None


def get_rng_states() -> dict:
    """Return the states of Python's, NumPy's and torch's generators as tensors and plain values.

    The result survives ``torch.load(weights_only=True)``, unlike the raw NumPy state.
    """
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore generator states returned by :func:`get_rng_states`."""
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
